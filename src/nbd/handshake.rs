//! The handshake: fixed newstyle negotiation, option by option, until the client picks an
//! export (NBD_OPT_GO or NBD_OPT_EXPORT_NAME) or leaves.
//!
//! Options served: EXPORT_NAME, ABORT, LIST, STARTTLS, INFO, GO, STRUCTURED_REPLY,
//! LIST_META_CONTEXT and SET_META_CONTEXT (`base:allocation`, `qemu:allocation-depth`); any
//! other is answered NBD_REP_ERR_UNSUP, so clients fall back (qemu tries EXTENDED_HEADERS
//! first). With TLS configured the server runs in FORCEDTLS mode: until STARTTLS, every option
//! but ABORT is refused with NBD_REP_ERR_TLS_REQD, and EXPORT_NAME closes the connection.
//!
//! A malformed option gets NBD_REP_ERR_INVALID; option data beyond `MAX_OPTION_DATA`, a wrong
//! magic, unknown client flags or too many options close the connection (an `Err`).

use std::io;
use std::sync::Arc;

use super::conn::Channel;
use super::exports::{Export, Exports};
use super::proto::*;
use crate::error::{Error, Result};

/// How the handshake is run.
#[derive(Clone, Default)]
pub struct HandshakeConfig {
    /// Present: TLS is required (FORCEDTLS).
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// The metadata contexts a client selected, by the id it was given.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Contexts {
    pub allocation: bool,
    pub depth: bool,
}

pub const ID_ALLOCATION: u32 = 1;
pub const ID_DEPTH: u32 = 2;

impl Contexts {
    pub fn any(&self) -> bool {
        self.allocation || self.depth
    }
}

/// What the handshake agreed on.
pub struct Negotiated {
    pub export: Export,
    pub structured: bool,
    pub contexts: Contexts,
}

/// How many options one connection may send before it is taken for a denial of service.
const MAX_OPTIONS: usize = 10_000;

/// The transmission flags of `export`.
pub fn transmission_flags(export: &Export) -> u16 {
    let mut flags = FLAG_HAS_FLAGS
        | FLAG_SEND_FLUSH
        | FLAG_SEND_FUA
        | FLAG_CAN_MULTI_CONN
        | FLAG_SEND_TRIM
        | FLAG_SEND_WRITE_ZEROES
        | FLAG_SEND_FAST_ZERO;
    if !export.writable {
        flags |= FLAG_READ_ONLY;
    }
    flags
}

fn io_err(e: io::Error) -> Error {
    Error::io("connection", e)
}

fn send(ch: &Channel, bytes: &[u8]) -> Result<()> {
    ch.writer().send(&[bytes]).map_err(io_err)
}

fn reply(ch: &Channel, option: u32, kind: u32, data: &[u8]) -> Result<()> {
    send(ch, &option_reply(option, kind, data))
}

fn refuse(ch: &Channel, option: u32, kind: u32, message: &str) -> Result<()> {
    reply(
        ch,
        option,
        kind,
        truncate_utf8(message, MAX_STRING).as_bytes(),
    )
}

/// Runs the handshake; `Ok(None)` when the client ended it without choosing an export.
pub fn negotiate(
    ch: &mut Channel,
    exports: &dyn Exports,
    config: &HandshakeConfig,
) -> Result<Option<Negotiated>> {
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    send(ch, &hello)?;
    let mut flags = [0u8; 4];
    ch.read_exact(&mut flags).map_err(io_err)?;
    let client_flags = u32::from_be_bytes(flags);
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(Error::out_of_range(format!(
            "unknown client flags {client_flags:#x}"
        )));
    }
    let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;
    let mut state = State::default();
    for _ in 0..MAX_OPTIONS {
        let mut header = [0u8; 16];
        ch.read_exact(&mut header).map_err(io_err)?;
        let OptionHeader { option, len } = parse_option_header(&header)?;
        if len > MAX_OPTION_DATA {
            return Err(Error::out_of_range(format!(
                "option {option} carries {len} bytes (at most {MAX_OPTION_DATA})"
            )));
        }
        // Bounded by the check above.
        let mut data = vec![0u8; len as usize];
        ch.read_exact(&mut data).map_err(io_err)?;
        if config.tls.is_some() && !ch.is_tls() && option != OPT_STARTTLS && option != OPT_ABORT {
            if option == OPT_EXPORT_NAME {
                return Err(Error::out_of_range(
                    "NBD_OPT_EXPORT_NAME before TLS on a server that requires TLS",
                ));
            }
            refuse(
                ch,
                option,
                REP_ERR_TLS_REQD,
                "TLS is required: use NBD_OPT_STARTTLS",
            )?;
            continue;
        }
        match option {
            OPT_EXPORT_NAME => {
                let name = parse_export_name(&data)?;
                let export = exports
                    .open(&name)?
                    .ok_or_else(|| Error::out_of_range(format!("no export {name:?}")))?;
                let mut out = Vec::with_capacity(134);
                out.extend_from_slice(&export.size().to_be_bytes());
                out.extend_from_slice(&transmission_flags(&export).to_be_bytes());
                if !no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                send(ch, &out)?;
                return Ok(Some(state.finish(export, &name)));
            }
            OPT_ABORT => {
                // The client may already be gone: the reply is a courtesy.
                let _ = reply(ch, option, REP_ACK, &[]);
                return Ok(None);
            }
            OPT_LIST => list(ch, exports, &data)?,
            OPT_STARTTLS => match (&config.tls, ch.is_tls(), data.is_empty()) {
                (None, _, _) => refuse(ch, option, REP_ERR_POLICY, "TLS is not configured")?,
                (Some(_), true, _) => refuse(ch, option, REP_ERR_INVALID, "TLS is already on")?,
                (Some(_), _, false) => refuse(ch, option, REP_ERR_INVALID, "unexpected data")?,
                (Some(tls), false, true) => {
                    reply(ch, option, REP_ACK, &[])?;
                    ch.start_tls(Arc::clone(tls)).map_err(io_err)?;
                    // Nothing negotiated in plain text survives the upgrade.
                    state = State::default();
                }
            },
            OPT_INFO | OPT_GO => {
                if let Some((export, name)) = info(ch, exports, option, &data)? {
                    return Ok(Some(state.finish(export, &name)));
                }
            }
            OPT_STRUCTURED_REPLY => match (data.is_empty(), state.structured) {
                (false, _) => refuse(ch, option, REP_ERR_INVALID, "unexpected data")?,
                (true, true) => refuse(ch, option, REP_ERR_INVALID, "already negotiated")?,
                (true, false) => {
                    state.structured = true;
                    reply(ch, option, REP_ACK, &[])?;
                }
            },
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                meta_context(ch, exports, option, &data, &mut state)?
            }
            _ => refuse(ch, option, REP_ERR_UNSUP, "option not supported")?,
        }
    }
    Err(Error::out_of_range(format!(
        "more than {MAX_OPTIONS} options in one handshake"
    )))
}

#[derive(Default)]
struct State {
    structured: bool,
    /// The contexts selected, and for which export name.
    selected: Option<(String, Contexts)>,
}

impl State {
    /// The agreement once the client chose export `export`, asked for as `requested`.
    fn finish(self, export: Export, requested: &str) -> Negotiated {
        // Contexts count only if they were selected for the name finally asked for.
        let contexts = match self.selected {
            Some((name, contexts)) if self.structured && name == requested => contexts,
            _ => Contexts::default(),
        };
        Negotiated {
            export,
            structured: self.structured,
            contexts,
        }
    }
}

fn list(ch: &Channel, exports: &dyn Exports, data: &[u8]) -> Result<()> {
    if !data.is_empty() {
        return refuse(ch, OPT_LIST, REP_ERR_INVALID, "unexpected data");
    }
    for entry in exports.list() {
        let description = truncate_utf8(&entry.description, MAX_STRING);
        let mut out = Vec::with_capacity(4 + entry.name.len() + description.len());
        out.extend_from_slice(&(entry.name.len() as u32).to_be_bytes());
        out.extend_from_slice(entry.name.as_bytes());
        out.extend_from_slice(description.as_bytes());
        reply(ch, OPT_LIST, REP_SERVER, &out)?;
    }
    reply(ch, OPT_LIST, REP_ACK, &[])
}

/// Opens `name`, answering an unknown export or a failed open on the channel.
fn open_or_refuse(
    ch: &Channel,
    exports: &dyn Exports,
    option: u32,
    name: &str,
) -> Result<Option<Export>> {
    match exports.open(name) {
        Ok(Some(export)) => Ok(Some(export)),
        Ok(None) => {
            refuse(ch, option, REP_ERR_UNKNOWN, &format!("no export {name:?}"))?;
            Ok(None)
        }
        Err(e) => {
            log::warn!("export {name:?}: {e}");
            refuse(
                ch,
                option,
                REP_ERR_UNKNOWN,
                &format!("export {name:?}: {e}"),
            )?;
            Ok(None)
        }
    }
}

/// NBD_OPT_INFO and NBD_OPT_GO: the export's size, flags, block sizes, name, description.
/// For GO, the export chosen and the name it was asked for.
fn info(
    ch: &Channel,
    exports: &dyn Exports,
    option: u32,
    data: &[u8],
) -> Result<Option<(Export, String)>> {
    let request = match parse_info_request(data) {
        Ok(request) => request,
        Err(e) => {
            refuse(ch, option, REP_ERR_INVALID, &e.to_string())?;
            return Ok(None);
        }
    };
    let Some(export) = open_or_refuse(ch, exports, option, &request.name)? else {
        return Ok(None);
    };
    let mut out = INFO_EXPORT.to_be_bytes().to_vec();
    out.extend_from_slice(&export.size().to_be_bytes());
    out.extend_from_slice(&transmission_flags(&export).to_be_bytes());
    reply(ch, option, REP_INFO, &out)?;
    // Sent whether asked for or not: the sizes are the defaults every client can honour.
    let mut sizes = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    sizes.extend_from_slice(&1u32.to_be_bytes());
    sizes.extend_from_slice(&export.preferred_block.to_be_bytes());
    sizes.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
    reply(ch, option, REP_INFO, &sizes)?;
    for asked in request.requests {
        let text = match asked {
            INFO_NAME => &export.name,
            INFO_DESCRIPTION => &export.description,
            _ => continue,
        };
        let mut out = asked.to_be_bytes().to_vec();
        out.extend_from_slice(truncate_utf8(text, MAX_STRING).as_bytes());
        reply(ch, option, REP_INFO, &out)?;
    }
    reply(ch, option, REP_ACK, &[])?;
    match option {
        OPT_GO => Ok(Some((export, request.name))),
        // Closed again: INFO only looks.
        _ => Ok(None),
    }
}

/// The contexts `query` selects (SET) or lists (LIST, where `namespace:` is a wildcard).
fn matching(query: &str, listing: bool) -> Contexts {
    let mut c = Contexts::default();
    match query {
        CONTEXT_BASE_ALLOCATION => c.allocation = true,
        CONTEXT_ALLOCATION_DEPTH => c.depth = true,
        "base:" if listing => c.allocation = true,
        "qemu:" if listing => c.depth = true,
        _ => {}
    }
    c
}

fn meta_context(
    ch: &Channel,
    exports: &dyn Exports,
    option: u32,
    data: &[u8],
    state: &mut State,
) -> Result<()> {
    let listing = option == OPT_LIST_META_CONTEXT;
    if !listing {
        // Replaces the selection even when it fails.
        state.selected = None;
    }
    if !state.structured {
        return refuse(
            ch,
            option,
            REP_ERR_INVALID,
            "negotiate structured replies first",
        );
    }
    let request = match parse_meta_request(data) {
        Ok(request) => request,
        Err(e) => {
            let kind = match e.to_string().contains("queries") {
                true => REP_ERR_TOO_BIG,
                false => REP_ERR_INVALID,
            };
            return refuse(ch, option, kind, &e.to_string());
        }
    };
    if !exports.exists(&request.name) {
        let message = format!("no export {:?}", request.name);
        return refuse(ch, option, REP_ERR_UNKNOWN, &message);
    }
    let mut chosen = Contexts::default();
    if request.queries.is_empty() && listing {
        chosen = Contexts {
            allocation: true,
            depth: true,
        };
    }
    for query in &request.queries {
        let c = matching(query, listing);
        chosen.allocation |= c.allocation;
        chosen.depth |= c.depth;
    }
    for (on, id, name) in [
        (chosen.allocation, ID_ALLOCATION, CONTEXT_BASE_ALLOCATION),
        (chosen.depth, ID_DEPTH, CONTEXT_ALLOCATION_DEPTH),
    ] {
        if on {
            // Ids are reserved (zero) in a listing.
            let id = if listing { 0 } else { id };
            let mut out = id.to_be_bytes().to_vec();
            out.extend_from_slice(name.as_bytes());
            reply(ch, option, REP_META_CONTEXT, &out)?;
        }
    }
    if !listing {
        state.selected = Some((request.name, chosen));
    }
    reply(ch, option, REP_ACK, &[])
}
