//! A clamd stand-in on a unix socket, for the tests that need clamd to misbehave. It
//! speaks the protocol as clamd does: one command per connection, or many in an
//! `IDSESSION` (each reply then `<id>: <reply>`, ids from 1), one thread per
//! connection.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// What the stand-in does with one command.
pub enum Answer {
    /// Replies this (the stand-in adds the session id and the terminating NUL).
    Reply(Vec<u8>),
    /// Closes the connection without a reply.
    Drop,
    /// Replies this, then closes the connection.
    ReplyThenClose(Vec<u8>),
    /// Reads the next command without replying to this one.
    Nothing,
    /// Keeps the connection open this long without a reply, then closes it.
    Hang(Duration),
}

/// Serves `path`. `answer` gets each command as sent (`zVERSION`, `zFILDES`, …); for
/// `zFILDES` the byte carrying the descriptor has been read (and the descriptor closed).
pub fn serve(path: &Path, answer: impl Fn(&[u8]) -> Answer + Send + Sync + 'static) {
    let listener = UnixListener::bind(path).unwrap();
    let answer = Arc::new(answer);
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(c) = conn else { continue };
            let answer = answer.clone();
            std::thread::spawn(move || connection(c, &*answer));
        }
    });
}

/// One NUL-terminated command; `None` at the end of the connection.
fn read_command(c: &mut UnixStream) -> Option<Vec<u8>> {
    let mut cmd = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match c.read(&mut b) {
            Ok(1) if b[0] != 0 => cmd.push(b[0]),
            Ok(1) => return Some(cmd),
            _ => return (!cmd.is_empty()).then_some(cmd),
        }
    }
}

fn connection(mut c: UnixStream, answer: &dyn Fn(&[u8]) -> Answer) {
    let Some(first) = read_command(&mut c) else {
        return;
    };
    let session = first == b"zIDSESSION";
    let mut cmd = if session {
        match read_command(&mut c) {
            Some(cmd) => cmd,
            None => return,
        }
    } else {
        first
    };
    let mut id = 0u64;
    loop {
        if cmd == b"zFILDES" {
            let mut b = [0u8; 1];
            let _ = c.read(&mut b);
        }
        id += 1;
        let (reply, close) = match answer(&cmd) {
            Answer::Reply(r) => (Some(r), false),
            Answer::ReplyThenClose(r) => (Some(r), true),
            Answer::Nothing => (None, false),
            Answer::Drop => return,
            Answer::Hang(d) => {
                std::thread::sleep(d);
                return;
            }
        };
        if let Some(r) = reply {
            let mut out = if session {
                format!("{id}: ").into_bytes()
            } else {
                Vec::new()
            };
            out.extend_from_slice(&r);
            out.push(0);
            if c.write_all(&out).is_err() {
                return;
            }
        }
        if close || !session {
            return;
        }
        match read_command(&mut c) {
            Some(next) if next != b"zEND" => cmd = next,
            _ => return,
        }
    }
}
