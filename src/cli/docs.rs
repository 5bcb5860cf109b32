//! The man page and the shell completions, generated from the clap definitions so they always
//! describe the commands as they are.

use std::path::Path;

use clap::CommandFactory;

use super::Cli;

/// Prints the completion script for `shell`.
pub fn completions(shell: clap_complete::Shell) -> Result<(), String> {
    let mut command = Cli::command();
    clap_complete::generate(shell, &mut command, "imgfs", &mut std::io::stdout());
    Ok(())
}

/// Prints imgfs.1, or writes it and a page per command into `dir`.
pub fn manual(dir: Option<&Path>) -> Result<(), String> {
    let command = Cli::command();
    let Some(dir) = dir else {
        return render(&command, &mut std::io::stdout());
    };
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut pages = vec![("imgfs".to_string(), command.clone())];
    for sub in command.get_subcommands() {
        let name = format!("imgfs-{}", sub.get_name());
        let page = sub
            .clone()
            .display_name(name.clone())
            .bin_name(format!("imgfs {}", sub.get_name()));
        pages.push((name, page));
    }
    for (name, page) in pages {
        let path = dir.join(format!("{name}.1"));
        let mut file =
            std::fs::File::create(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        render(&page, &mut file)?;
    }
    Ok(())
}

fn render(command: &clap::Command, out: &mut dyn std::io::Write) -> Result<(), String> {
    clap_mangen::Man::new(command.clone())
        .render(out)
        .map_err(|e| format!("writing the man page: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_man_pages_name_every_command() {
        let dir = crate::testutil::TempDir::new();
        manual(Some(dir.path())).unwrap();
        let main = std::fs::read_to_string(dir.path().join("imgfs.1")).unwrap();
        for command in [
            "mount",
            "umount",
            "nbd",
            "info",
            "check",
            "map",
            "completions",
            "manual",
        ] {
            assert!(main.contains(command), "{command}");
            assert!(dir.path().join(format!("imgfs-{command}.1")).exists());
        }
        let mount = std::fs::read_to_string(dir.path().join("imgfs-mount.1")).unwrap();
        assert!(mount.contains("umask"), "the -o options are described");
    }

    #[test]
    fn the_command_line_definitions_are_consistent() {
        Cli::command().debug_assert();
    }
}
