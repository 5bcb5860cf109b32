//! `--allow` patterns over export names: `*` matches within one path component, `**` across
//! components, `?` one character other than `/`; everything else matches itself. Matching is a
//! table walk over (pattern position, name position), so a hostile name costs at most
//! pattern length x name length steps, never exponential backtracking.

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token {
    Char(char),
    /// `?`
    One,
    /// `*`
    Star,
    /// `**`
    Stars,
}

/// A compiled `--allow` pattern.
#[derive(Debug, Clone)]
pub struct Glob {
    tokens: Vec<Token>,
}

impl Glob {
    pub fn new(pattern: &str) -> Result<Self> {
        if pattern.is_empty() {
            return Err(Error::out_of_range("an empty --allow pattern"));
        }
        let mut tokens = Vec::new();
        let mut chars = pattern.chars().peekable();
        while let Some(c) = chars.next() {
            tokens.push(match c {
                '*' if chars.peek() == Some(&'*') => {
                    chars.next();
                    // `a/**/b` also matches `a/b`: the slash after `**` is optional.
                    Token::Stars
                }
                '*' => Token::Star,
                '?' => Token::One,
                c => Token::Char(c),
            });
        }
        Ok(Glob { tokens })
    }

    pub fn matches(&self, name: &str) -> bool {
        let name: Vec<char> = name.chars().collect();
        // reach[j]: the pattern consumed so far can end at name position j.
        let mut reach = vec![false; name.len() + 1];
        reach[0] = true;
        for (i, token) in self.tokens.iter().enumerate() {
            let mut next = vec![false; name.len() + 1];
            match token {
                Token::Char(c) => {
                    for j in 0..name.len() {
                        next[j + 1] = reach[j] && name[j] == *c;
                    }
                    // `**/` may match nothing at all, slash included.
                    if *c == '/' && i > 0 && self.tokens[i - 1] == Token::Stars {
                        for j in 0..=name.len() {
                            next[j] |= reach[j] && (j == 0 || name[j - 1] == '/');
                        }
                    }
                }
                Token::One => {
                    for j in 0..name.len() {
                        next[j + 1] = reach[j] && name[j] != '/';
                    }
                }
                Token::Star | Token::Stars => {
                    let crosses = *token == Token::Stars;
                    let mut on = false;
                    for j in 0..=name.len() {
                        on = reach[j] || (on && j > 0 && (crosses || name[j - 1] != '/'));
                        next[j] = on;
                    }
                }
            }
            reach = next;
        }
        reach[name.len()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pattern: &str, name: &str) -> bool {
        Glob::new(pattern).unwrap().matches(name)
    }

    #[test]
    fn stars_stay_in_their_component_unless_doubled() {
        assert!(m("*.vdi", "disk.vdi"));
        assert!(!m("*.vdi", "vm/disk.vdi"));
        assert!(m("vm/*", "vm/disk.vdi"));
        assert!(!m("vm/*", "vm/disk.vdi.parts/p1"));
        assert!(m("vm/**", "vm/disk.vdi.parts/p1"));
        assert!(m("**/*.qcow2", "a/b/c.qcow2"));
        assert!(m("**/*.qcow2", "c.qcow2"));
        assert!(m("a/**/b", "a/b"));
        assert!(m("disk?.vmdk", "disk1.vmdk"));
        assert!(!m("disk?.vmdk", "disk/.vmdk"));
        assert!(!m("vm/disk.vdi", "vm/disk.vdix"));
        assert!(Glob::new("").is_err());
    }

    #[test]
    fn hostile_names_cost_linear_time() {
        let g = Glob::new(&"*a".repeat(50)).unwrap();
        let name = "a".repeat(4000) + "b";
        assert!(!g.matches(&name));
    }
}
