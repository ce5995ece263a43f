//! A small real SMTP server on 127.0.0.1 for the notification tests: greeting, EHLO
//! with capabilities, AUTH PLAIN/LOGIN (accepted, credentials recorded), optional
//! STARTTLS, MAIL/RCPT/DATA/RSET/NOOP/QUIT, dot-unstuffing. It records every command,
//! every message (envelope, headers, decoded body) and every byte received on the
//! wire ([`Smtp::wire`]: as sent, before any TLS decryption).
//!
//! Modes: `Normal` (AUTH offered, no STARTTLS: a server that would take a password in
//! clear); `Hang` (accepts connections, never says a word); `StartTlsThenClose`
//! (advertises STARTTLS, answers 220 to it, then drops the connection, so the client's
//! TLS handshake fails); `Tls` (a real STARTTLS session with the given rustls config);
//! `Slow` (like `Normal`, but each message is taken only after the given delay: a
//! mail server that falls behind).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone)]
pub enum Mode {
    Normal,
    Hang,
    StartTlsThenClose,
    Tls(Arc<rustls::ServerConfig>),
    Slow(Duration),
}

#[derive(Debug, Clone, Default)]
pub struct Mail {
    pub from: String,
    pub rcpt: Vec<String>,
    pub headers: Vec<(String, String)>,
    pub body: String,
    /// `user\0password` as the client authenticated, if it did.
    pub auth: Option<String>,
    /// Whether the message came over TLS.
    pub tls: bool,
}

impl Mail {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn subject(&self) -> &str {
        self.header("Subject").unwrap_or("")
    }
}

#[derive(Default)]
struct Seen {
    mails: Vec<Mail>,
    commands: Vec<String>,
    /// Every byte read from client sockets, in arrival order.
    wire: Vec<u8>,
}

/// A client socket that records every byte read from it.
struct Wire {
    conn: TcpStream,
    seen: Arc<Mutex<Seen>>,
}

impl Read for Wire {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.conn.read(buf)?;
        self.seen.lock().unwrap().wire.extend_from_slice(&buf[..n]);
        Ok(n)
    }
}

impl Write for Wire {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.conn.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.conn.flush()
    }
}

pub struct Smtp {
    pub port: u16,
    seen: Arc<Mutex<Seen>>,
}

impl Smtp {
    pub fn start(mode: Mode) -> Smtp {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let s = Arc::clone(&seen);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let (s, mode) = (Arc::clone(&s), mode.clone());
                std::thread::spawn(move || {
                    if let Mode::Hang = mode {
                        std::thread::sleep(Duration::from_secs(3600));
                        drop(conn);
                        return;
                    }
                    let _ = session(conn, &mode, &s);
                });
            }
        });
        Smtp { port, seen }
    }

    /// A port where nothing listens (connection refused).
    pub fn down_port() -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    }

    pub fn mails(&self) -> Vec<Mail> {
        self.seen.lock().unwrap().mails.clone()
    }

    pub fn commands(&self) -> Vec<String> {
        self.seen.lock().unwrap().commands.clone()
    }

    /// Every byte the server received, as it came over the wire.
    pub fn wire(&self) -> Vec<u8> {
        self.seen.lock().unwrap().wire.clone()
    }

    /// Waits until at least `n` messages arrived (the run has ended by then anyway:
    /// it waits for its mail queue).
    pub fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Mail> {
        let t = Instant::now();
        loop {
            let m = self.mails();
            if m.len() >= n || t.elapsed() > timeout {
                return m;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

trait Stream: Read + Write {}
impl<T: Read + Write> Stream for T {}

fn session(conn: TcpStream, mode: &Mode, seen: &Arc<Mutex<Seen>>) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut tls = false;
    let wire = |conn: &TcpStream| -> std::io::Result<Wire> {
        Ok(Wire {
            conn: conn.try_clone()?,
            seen: Arc::clone(seen),
        })
    };
    let mut stream: Box<dyn Stream> = Box::new(wire(&conn)?);
    stream.write_all(b"220 test.invalid ESMTP test server\r\n")?;
    let mut r = BufReader::new(stream);
    let mut auth = None;
    let mut current = Mail::default();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let line = line.trim_end_matches(['\r', '\n']).to_string();
        seen.lock().unwrap().commands.push(line.clone());
        let upper = line.to_ascii_uppercase();
        let w = r.get_mut();
        if upper.starts_with("EHLO") {
            let mut caps = String::from("250-test.invalid\r\n250-AUTH PLAIN LOGIN\r\n");
            if !tls && !matches!(mode, Mode::Normal | Mode::Slow(_)) {
                caps.push_str("250-STARTTLS\r\n");
            }
            caps.push_str("250 8BITMIME\r\n");
            w.write_all(caps.as_bytes())?;
        } else if upper.starts_with("HELO") {
            w.write_all(b"250 test.invalid\r\n")?;
        } else if upper == "STARTTLS" {
            w.write_all(b"220 go ahead\r\n")?;
            w.flush()?;
            match mode {
                Mode::Tls(cfg) => {
                    let sc = rustls::ServerConnection::new(Arc::clone(cfg)).unwrap();
                    let s = rustls::StreamOwned::new(sc, wire(&conn)?);
                    r = BufReader::new(Box::new(s));
                    tls = true;
                }
                _ => return Ok(()),
            }
        } else if upper.starts_with("AUTH PLAIN") {
            let arg = line[10..].trim().to_string();
            let arg = if arg.is_empty() {
                w.write_all(b"334 \r\n")?;
                let mut l = String::new();
                r.read_line(&mut l)?;
                l.trim().to_string()
            } else {
                arg
            };
            let raw = b64(&arg);
            // authzid \0 user \0 password
            let s = String::from_utf8_lossy(&raw).into_owned();
            auth = Some(s.trim_start_matches('\0').to_string());
            r.get_mut().write_all(b"235 ok\r\n")?;
        } else if upper.starts_with("AUTH LOGIN") {
            w.write_all(b"334 VXNlcm5hbWU6\r\n")?;
            let mut u = String::new();
            r.read_line(&mut u)?;
            r.get_mut().write_all(b"334 UGFzc3dvcmQ6\r\n")?;
            let mut p = String::new();
            r.read_line(&mut p)?;
            auth = Some(format!(
                "{}\0{}",
                String::from_utf8_lossy(&b64(u.trim())),
                String::from_utf8_lossy(&b64(p.trim()))
            ));
            r.get_mut().write_all(b"235 ok\r\n")?;
        } else if upper.starts_with("MAIL FROM:") {
            current = Mail {
                from: addr(&line[10..]),
                auth: auth.clone(),
                tls,
                ..Default::default()
            };
            w.write_all(b"250 ok\r\n")?;
        } else if upper.starts_with("RCPT TO:") {
            current.rcpt.push(addr(&line[8..]));
            w.write_all(b"250 ok\r\n")?;
        } else if upper == "DATA" {
            w.write_all(b"354 go on\r\n")?;
            let mut data = Vec::new();
            loop {
                let mut l = String::new();
                if r.read_line(&mut l)? == 0 {
                    return Ok(());
                }
                let l = l.trim_end_matches(['\r', '\n']);
                if l == "." {
                    break;
                }
                // Dot-unstuffing (RFC 5321 4.5.2).
                data.push(l.strip_prefix('.').unwrap_or(l).to_string());
            }
            let (headers, body) = parse(&data);
            current.headers = headers;
            current.body = body;
            seen.lock()
                .unwrap()
                .mails
                .push(std::mem::take(&mut current));
            if let Mode::Slow(delay) = mode {
                std::thread::sleep(*delay);
            }
            r.get_mut().write_all(b"250 queued\r\n")?;
        } else if upper == "RSET" || upper == "NOOP" {
            w.write_all(b"250 ok\r\n")?;
        } else if upper == "QUIT" {
            w.write_all(b"221 bye\r\n")?;
            return Ok(());
        } else {
            w.write_all(b"502 not implemented\r\n")?;
        }
        r.get_mut().flush()?;
    }
}

fn addr(s: &str) -> String {
    let s = s.trim();
    let s = s.split_whitespace().next().unwrap_or("");
    s.trim_start_matches('<').trim_end_matches('>').to_string()
}

/// Headers (unfolded) and the body decoded per Content-Transfer-Encoding.
fn parse(lines: &[String]) -> (Vec<(String, String)>, String) {
    let mut headers: Vec<(String, String)> = Vec::new();
    let mut i = 0;
    while i < lines.len() && !lines[i].is_empty() {
        let l = &lines[i];
        if l.starts_with([' ', '\t']) {
            if let Some(h) = headers.last_mut() {
                h.1.push(' ');
                h.1.push_str(l.trim());
            }
        } else if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
        i += 1;
    }
    let raw = lines.get(i + 1..).unwrap_or(&[]);
    let cte = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("Content-Transfer-Encoding"))
        .map(|(_, v)| v.to_ascii_lowercase())
        .unwrap_or_default();
    let body = match cte.as_str() {
        "base64" => String::from_utf8_lossy(&b64(&raw.concat())).into_owned(),
        "quoted-printable" => qp(raw),
        _ => raw.join("\n"),
    };
    for h in &mut headers {
        h.1 = decode_words(&h.1);
    }
    (headers, body.replace("\r\n", "\n"))
}

/// Decodes RFC 2047 `=?utf-8?b?...?=` / `=?utf-8?q?...?=` words (lettre uses them for
/// non-ASCII subjects).
fn decode_words(v: &str) -> String {
    let mut out = String::new();
    for word in v.split(' ') {
        let lower = word.to_ascii_lowercase();
        if lower.starts_with("=?utf-8?b?") && word.ends_with("?=") {
            out.push_str(&String::from_utf8_lossy(&b64(&word[10..word.len() - 2])));
        } else if lower.starts_with("=?utf-8?q?") && word.ends_with("?=") {
            out.push_str(&qp(&[word[10..word.len() - 2].replace('_', " ")]));
        } else {
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str(word);
        }
    }
    out
}

fn qp(lines: &[String]) -> String {
    let mut bytes = Vec::new();
    for (n, l) in lines.iter().enumerate() {
        let b = l.as_bytes();
        let soft = b.last() == Some(&b'=');
        let b = if soft { &b[..b.len() - 1] } else { b };
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'='
                && i + 2 < b.len()
                && let Ok(v) =
                    u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16)
            {
                bytes.push(v);
                i += 3;
                continue;
            }
            bytes.push(b[i]);
            i += 1;
        }
        if !soft && n + 1 < lines.len() {
            bytes.push(b'\n');
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

pub fn b64(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes().filter_map(val) {
        acc = (acc << 6) | c as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}
