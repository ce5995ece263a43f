//! ClamAV through clamd's own socket protocol (no `clamdscan` process per file).
//!
//! Over a unix socket the open descriptor is passed with `FILDES` (SCM_RIGHTS), so
//! clamd needs no read access to the quarantine. Over TCP the bytes are streamed with
//! `INSTREAM`; clamd refuses streams above its `StreamMaxLength` with an `ERROR`, which
//! makes the file failed, never clean. Commands use the `z` prefix (NUL-terminated).
//! No clamd client crate on crates.io supports FILDES, hence this module.

use std::fs::File;
use std::io::{self, IoSlice, Read, Write};
use std::mem::MaybeUninit;
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};

use super::{ScanError, Scanner, Verdict};
use crate::config::ClamdEndpoint;

/// The longest wait for clamd to accept a connection, take a write, or answer a
/// short command (`VERSION`, `PING`); shorter when the scan timeout is shorter.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// INSTREAM chunk size.
const CHUNK: usize = 64 * 1024;
/// The longest an `IDSESSION` connection is used: well within clamd's `IdleTimeout`
/// (30 s by default), and short enough that a clamd restart or reload is met by new
/// connections soon.
const SESSION_AGE: Duration = Duration::from_secs(10);

pub struct ClamAv {
    endpoint: ClamdEndpoint,
    /// Deadline for connecting, each write, and short commands' replies.
    command_timeout: Duration,
    /// Idle `IDSESSION` connections (unix socket only), for the next command.
    sessions: Mutex<Vec<Session>>,
}

/// An open `IDSESSION` connection with no command outstanding.
struct Session {
    sock: UnixStream,
    /// The id clamd gives the next command's reply (the first is 1).
    next_id: u64,
    opened: Instant,
    /// The socket's read timeout now (set only when a command needs another).
    read_timeout: Option<Duration>,
}

impl Session {
    /// Sets how long a read waits for clamd (only when that changes).
    fn wait_at_most(&mut self, timeout: Option<Duration>) -> Result<(), ScanError> {
        if self.read_timeout != timeout {
            self.sock
                .set_read_timeout(timeout)
                .map_err(|e| ScanError::Failed(format!("cannot set clamd socket timeout: {e}")))?;
            self.read_timeout = timeout;
        }
        Ok(())
    }
}

/// What one command (or a scan with its `VERSION`) on a session came to.
enum SessionReply<T = String> {
    /// clamd's reply, without the `<id>: ` prefix; the session is fit for reuse.
    Reply(T, Session),
    /// A reply that is not fit to reuse the session after (an error, an unexpected
    /// reply): passed on as it is, the session dropped.
    Final(Result<T, ScanError>),
    /// The connection failed before any reply (a reused session clamd had closed).
    Broken(ScanError),
}

enum Conn {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Conn {
    fn set_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Conn::Unix(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            Conn::Tcp(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
        }
    }

    fn stream(&mut self) -> &mut dyn ReadWrite {
        match self {
            Conn::Unix(s) => s,
            Conn::Tcp(s) => s,
        }
    }
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

impl ClamAv {
    /// `scan_timeout`: the configured base scan timeout (0 = none); no connection,
    /// write or short command waits longer than it, or than 30 seconds.
    pub fn new(endpoint: ClamdEndpoint, scan_timeout: Duration) -> ClamAv {
        let command_timeout = if scan_timeout.is_zero() {
            COMMAND_TIMEOUT
        } else {
            scan_timeout.clamp(Duration::from_secs(1), COMMAND_TIMEOUT)
        };
        ClamAv {
            endpoint,
            command_timeout,
            sessions: Mutex::new(Vec::new()),
        }
    }

    /// An idle session young enough to use, or a new one.
    fn session(&self, path: &Path) -> Result<(Session, bool), ScanError> {
        let idle = {
            let mut idle = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
            idle.retain(|s| s.opened.elapsed() < SESSION_AGE);
            idle.pop()
        };
        if let Some(s) = idle {
            return Ok((s, true));
        }
        let unreachable =
            |e: io::Error| ScanError::Unreachable(format!("clamd at {}: {e}", self.endpoint));
        let sock = connect_unix(path, self.command_timeout).map_err(unreachable)?;
        sock.set_read_timeout(Some(self.command_timeout))
            .and_then(|()| sock.set_write_timeout(Some(self.command_timeout)))
            .and_then(|()| send_all(&sock, b"zIDSESSION\0"))
            .map_err(unreachable)?;
        Ok((
            Session {
                sock,
                next_id: 1,
                opened: Instant::now(),
                read_timeout: Some(self.command_timeout),
            },
            false,
        ))
    }

    /// Sends one command on a session (`file`: a descriptor passed with `FILDES`) and
    /// reads its reply, waiting at most `timeout` for it.
    fn session_command(
        &self,
        mut s: Session,
        cmd: &str,
        file: Option<&File>,
        timeout: Option<Duration>,
    ) -> SessionReply {
        let id = s.next_id;
        s.next_id += 1;
        let sent = match file {
            Some(f) => send_fildes(&mut s.sock, b"zFILDES\0", f),
            None => send_all(&s.sock, format!("z{cmd}\0").as_bytes()),
        };
        if let Err(e) = sent {
            return SessionReply::Broken(ScanError::Failed(format!(
                "sending to clamd failed: {e}"
            )));
        }
        if let Err(e) = s.wait_at_most(timeout) {
            return SessionReply::Final(Err(e));
        }
        let reply = match read_reply_opt(&mut s.sock, timeout) {
            Ok(r) if r.is_empty() => {
                return SessionReply::Broken(ScanError::Failed(
                    "clamd closed the connection without a reply".into(),
                ));
            }
            Ok(r) => r,
            Err(e @ ScanError::Failed(_)) => return SessionReply::Broken(e),
            Err(e) => return SessionReply::Final(Err(e)),
        };
        let prefix = format!("{id}: ");
        let Some(body) = reply.strip_prefix(&prefix) else {
            return SessionReply::Final(Err(ScanError::Failed(format!(
                "unexpected reply in a clamd session (expected id {id}): {reply:?}"
            ))));
        };
        let body = body.trim_end_matches(['\0', '\n']).to_string();
        // Only a plainly clean scan, or a short command's answer, leaves the session in
        // a known state: clamd may close it after an error, and may send more than one
        // line for a detection (AllMatchScanning), so those end the session.
        let reusable = reply.ends_with('\0')
            && !body.contains('\0')
            && match file {
                Some(_) => body.ends_with(": OK"),
                None => !body.ends_with("ERROR"),
            };
        if reusable {
            SessionReply::Reply(body, s)
        } else {
            SessionReply::Final(Ok(body))
        }
    }

    /// One exchange over a unix socket, through a session: a reused session that
    /// turns out closed is replaced by a new connection, once.
    fn over_session<T>(
        &self,
        path: &Path,
        exchange: impl Fn(Session) -> SessionReply<T>,
    ) -> Result<T, ScanError> {
        let (s, reused) = self.session(path)?;
        let outcome = match exchange(s) {
            SessionReply::Broken(e) if reused => {
                tracing::debug!(
                    "clamd session at {} was closed ({e}); reconnecting",
                    self.endpoint
                );
                let (s, _) = self.session(path)?;
                exchange(s)
            }
            other => other,
        };
        match outcome {
            SessionReply::Reply(body, s) => {
                self.sessions
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(s);
                Ok(body)
            }
            SessionReply::Final(r) => r,
            SessionReply::Broken(e) => Err(e),
        }
    }

    /// `VERSION` and `FILDES` sent together on a session, both replies read: the
    /// scan's verdict and the signatures clamd had just before it took the scan, in
    /// one round trip instead of two.
    ///
    /// clamd reads a session's commands in order, answers `VERSION` at once from the
    /// database loaded at that moment, and only then reads the `FILDES` and hands the
    /// scan to a thread. The scan therefore uses that database or one loaded after it:
    /// the version the freshness check judges is never that of a database loaded
    /// after the scan's. (Asked after the scan, it could name a database loaded after
    /// the scan had started with the old one, and vouch for a stale scan.) A
    /// reload on an open session is seen by its next `VERSION` (checked against
    /// clamd 1.4). Each reply is tagged with its command's id.
    fn session_scan(
        &self,
        mut s: Session,
        file: &File,
        timeout: Option<Duration>,
    ) -> SessionReply<(String, Option<String>)> {
        let version_id = s.next_id;
        let scan_id = version_id + 1;
        s.next_id += 2;
        if let Err(e) = send_fildes(&mut s.sock, b"zVERSION\0zFILDES\0", file) {
            return SessionReply::Broken(ScanError::Failed(format!(
                "sending to clamd failed: {e}"
            )));
        }
        // `next_message` waits with `poll`, bounded by `timeout` itself: the socket's
        // own read timeout does not come into it.
        let started = Instant::now();
        let mut pending = Vec::new();
        let (mut scan, mut version, mut extra, mut interleaved) = (None, None, false, false);
        while scan.is_none() || version.is_none() {
            let msg = match next_message(&mut s.sock, &mut pending, started, timeout) {
                Ok(Some(m)) => m,
                // Closed: after the scan's reply this is the scan's outcome (clamd
                // ends a session after some errors); before it, the session broke.
                Ok(None) if scan.is_some() => break,
                Ok(None) if version.is_none() => {
                    return SessionReply::Broken(ScanError::Failed(
                        "clamd closed the connection without a reply".into(),
                    ));
                }
                Ok(None) => {
                    return SessionReply::Final(Err(ScanError::Failed(
                        "clamd closed the connection without the scan's reply".into(),
                    )));
                }
                Err(e @ ScanError::Failed(_)) if scan.is_none() && version.is_none() => {
                    return SessionReply::Broken(e);
                }
                Err(e) => return SessionReply::Final(Err(e)),
            };
            let tagged = split_id(&msg);
            // clamd writes a `VERSION` reply's `<id>: ` and its text separately, so a
            // scan's reply finished meanwhile could land between them:
            // `<v>: <s>: fd[..]: OK\0ClamAV ...\0`. Such a message is the scan's, and
            // the untagged `ClamAV ...` after it the version. (With `VERSION` asked
            // first clamd has answered it before the scan starts; this stays for a
            // clamd that does otherwise.)
            let tagged = match tagged {
                Some((id, body)) if id == version_id && version.is_none() => match split_id(body) {
                    Some((inner, rest)) if inner == scan_id => {
                        interleaved = true;
                        Some((scan_id, rest))
                    }
                    _ => Some((id, body)),
                },
                other => other,
            };
            match tagged {
                Some((id, body)) if id == scan_id && scan.is_none() => {
                    scan = Some(body.trim_end_matches('\n').to_string());
                }
                // More than one line for the scan (AllMatchScanning): a detection.
                Some((id, _)) if id == scan_id => extra = true,
                Some((id, body)) if id == version_id && version.is_none() => {
                    version = Some(body.trim_end_matches('\n').to_string());
                }
                None if interleaved && version.is_none() && msg.starts_with("ClamAV ") => {
                    version = Some(msg.trim_end_matches('\n').to_string());
                }
                _ => {
                    return SessionReply::Final(Err(ScanError::Failed(format!(
                        "unexpected reply in a clamd session (expected ids {version_id} and \
                         {scan_id}; so far scan {scan:?}, version {version:?}): {msg:?}"
                    ))));
                }
            }
        }
        let Some(scan) = scan else {
            return SessionReply::Final(Err(ScanError::Failed(
                "clamd closed the connection without the scan's reply".into(),
            )));
        };
        // Only a plainly clean scan and a plain VERSION, with nothing left over, leave
        // the session in a known state.
        let reusable = !extra
            && !interleaved
            && pending.is_empty()
            && scan.ends_with(": OK")
            && version.as_deref().is_some_and(|v| v.starts_with("ClamAV "));
        if reusable {
            SessionReply::Reply((scan, version), s)
        } else {
            SessionReply::Final(Ok((scan, version)))
        }
    }

    /// Scans `file` and asks clamd's version right after: the verdict, and the
    /// `VERSION` reply if clamd gave one (`None`: it did not answer it). Over a unix
    /// socket both go in one round trip on a session.
    pub fn scan_with_version(
        &self,
        file: &File,
        path: &Path,
        size: u64,
        timeout: Option<Duration>,
    ) -> Result<(Verdict, Option<String>), ScanError> {
        if let ClamdEndpoint::Unix(sock) = &self.endpoint {
            let (reply, version) =
                self.over_session(sock, |s| self.session_scan(s, file, timeout))?;
            let version = version.filter(|v| v.starts_with("ClamAV "));
            return Ok((parse_reply(&reply)?, version));
        }
        let verdict = self.scan(file, path, size, timeout)?;
        Ok((verdict, self.version().ok()))
    }

    fn connect(&self) -> Result<Conn, ScanError> {
        let unreachable =
            |e: io::Error| ScanError::Unreachable(format!("clamd at {}: {e}", self.endpoint));
        let conn = match &self.endpoint {
            ClamdEndpoint::Unix(p) => {
                Conn::Unix(connect_unix(p, self.command_timeout).map_err(unreachable)?)
            }
            ClamdEndpoint::Tcp(addr) => {
                use std::net::ToSocketAddrs;
                let sa = addr
                    .to_socket_addrs()
                    .map_err(unreachable)?
                    .next()
                    .ok_or_else(|| {
                        ScanError::Unreachable(format!("clamd address {addr} resolves to nothing"))
                    })?;
                Conn::Tcp(
                    TcpStream::connect_timeout(&sa, self.command_timeout).map_err(unreachable)?,
                )
            }
        };
        conn.set_timeout(Some(self.command_timeout))
            .map_err(unreachable)?;
        Ok(conn)
    }

    /// The clamd this talks to.
    pub fn endpoint(&self) -> &ClamdEndpoint {
        &self.endpoint
    }

    /// `PING`: clamd answers `PONG` when it is up and accepting commands.
    pub fn ping(&self) -> Result<(), ScanError> {
        match self.command("PING")?.as_str() {
            "PONG" => Ok(()),
            other => Err(ScanError::Failed(format!(
                "unexpected PING reply from clamd: {other:?}"
            ))),
        }
    }

    /// Sends a short command (`PING`, `VERSION`) and returns the reply.
    pub fn command(&self, cmd: &str) -> Result<String, ScanError> {
        if let ClamdEndpoint::Unix(path) = &self.endpoint {
            return self
                .over_session(path, |s| {
                    self.session_command(s, cmd, None, Some(self.command_timeout))
                })
                .map_err(|e| match e {
                    ScanError::Failed(m) => ScanError::Failed(format!("clamd {cmd}: {m}")),
                    other => other,
                });
        }
        let mut conn = self.connect()?;
        let io_err = |e: io::Error| ScanError::Failed(format!("clamd {cmd}: {e}"));
        conn.stream()
            .write_all(format!("z{cmd}\0").as_bytes())
            .map_err(io_err)?;
        let reply = read_reply(conn.stream(), self.command_timeout)?;
        Ok(reply.trim_end_matches(['\0', '\n']).to_string())
    }

    fn scan_instream(&self, conn: &mut Conn, file: &File) -> io::Result<()> {
        let s = conn.stream();
        s.write_all(b"zINSTREAM\0")?;
        let mut reader = file;
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            s.write_all(&(n as u32).to_be_bytes())?;
            s.write_all(&buf[..n])?;
        }
        s.write_all(&0u32.to_be_bytes())
    }
}

impl Scanner for ClamAv {
    fn name(&self) -> &'static str {
        "clamav"
    }

    fn version(&self) -> Result<String, ScanError> {
        let v = self.command("VERSION")?;
        if v.starts_with("ClamAV ") {
            Ok(v)
        } else {
            Err(ScanError::Failed(format!(
                "unexpected VERSION reply from clamd: {v:?}"
            )))
        }
    }

    fn signatures(&self, version: &str) -> Result<super::Signatures, ScanError> {
        Ok(parse_signatures(version))
    }

    fn scan(
        &self,
        file: &File,
        _path: &Path,
        _size: u64,
        timeout: Option<Duration>,
    ) -> Result<Verdict, ScanError> {
        if let ClamdEndpoint::Unix(path) = &self.endpoint {
            let reply = self.over_session(path, |s| {
                self.session_command(s, "FILDES", Some(file), timeout)
            })?;
            return parse_reply(&reply);
        }
        let mut conn = self.connect()?;
        let sent = self.scan_instream(&mut conn, file);
        // The scan itself may take long: wait for the reply up to the scan timeout.
        if let Err(e) = conn.set_timeout(timeout) {
            return Err(ScanError::Failed(format!(
                "cannot set clamd socket timeout: {e}"
            )));
        }
        // clamd may refuse a stream midway (size limit) and close: its reply says why.
        let reply = read_reply_opt(conn.stream(), timeout);
        match (sent, reply) {
            (_, Ok(r)) if !r.is_empty() => parse_reply(&r),
            (_, Err(ScanError::Timeout(t))) => Err(ScanError::Timeout(t)),
            (Err(e), _) => Err(ScanError::Failed(format!("sending to clamd failed: {e}"))),
            (Ok(()), Ok(_)) => Err(ScanError::Failed(
                "clamd closed the connection without a reply".into(),
            )),
            (Ok(()), Err(e)) => Err(e),
        }
    }
}

/// `FILDES`: writes `commands` (ending with `zFILDES\0`; anything ahead of it goes in
/// the same write), then passes `file`'s descriptor (SCM_RIGHTS), so clamd reads it
/// without access to the quarantine.
fn send_fildes(sock: &mut UnixStream, commands: &[u8], file: &File) -> io::Result<()> {
    send_all(sock, commands)?;
    let fds = [file.as_fd()];
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(io::Error::other("cannot build SCM_RIGHTS message"));
    }
    rustix::net::sendmsg(
        &*sock,
        &[IoSlice::new(b"\0")],
        &mut control,
        SendFlags::NOSIGNAL,
    )?;
    Ok(())
}

/// Writes all of `buf` with `MSG_NOSIGNAL`: a session clamd has closed meanwhile
/// answers `EPIPE` (and is replaced), never a SIGPIPE, whatever its disposition.
fn send_all(sock: &UnixStream, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        match rustix::net::send(sock, buf, SendFlags::NOSIGNAL) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Connects to clamd's unix socket within `deadline`. `UnixStream::connect` blocks
/// without limit while the socket's listen queue is full (a clamd that stopped
/// accepting); a non-blocking connect answers `EAGAIN` then, and is retried until the
/// deadline.
fn connect_unix(path: &Path, deadline: Duration) -> io::Result<UnixStream> {
    use rustix::io::Errno;
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let addr = SocketAddrUnix::new(path)?;
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )?;
    let started = std::time::Instant::now();
    loop {
        match rustix::net::connect(&fd, &addr) {
            Ok(()) => break,
            Err(Errno::AGAIN | Errno::INTR) if started.elapsed() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(Errno::AGAIN) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "no connection accepted within {}s (is clamd hung?)",
                        deadline.as_secs()
                    ),
                ));
            }
            Err(e) => return Err(e.into()),
        }
    }
    let stream = UnixStream::from(fd);
    stream.set_nonblocking(false)?;
    Ok(stream)
}

fn read_reply(s: &mut dyn ReadWrite, timeout: Duration) -> Result<String, ScanError> {
    read_reply_opt(s, Some(timeout))
}

/// Reads until clamd closes the connection (it does after one reply outside a
/// session) or sends the terminating NUL.
fn read_reply_opt(s: &mut dyn ReadWrite, timeout: Option<Duration>) -> Result<String, ScanError> {
    let started = std::time::Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        // The socket timeout applies per read; clamd sends nothing until it is done.
        if let Some(t) = timeout {
            let left = t.saturating_sub(started.elapsed());
            if left.is_zero() {
                return Err(ScanError::Timeout(t));
            }
        }
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                if out.ends_with(b"\0") {
                    break;
                }
                if out.len() > 64 * 1024 {
                    return Err(ScanError::Failed("clamd reply is implausibly long".into()));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if is_timeout(&e) => {
                return Err(ScanError::Timeout(timeout.unwrap_or(COMMAND_TIMEOUT)));
            }
            Err(e) if !out.is_empty() => {
                tracing::debug!("clamd connection error after partial reply: {e}");
                break;
            }
            Err(e) => return Err(ScanError::Failed(format!("reading clamd reply: {e}"))),
        }
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// `<id>: <rest>` split, if the message starts with a session id.
fn split_id(msg: &str) -> Option<(u64, &str)> {
    let (id, rest) = msg.split_once(": ")?;
    Some((id.parse().ok()?, rest))
}

/// The next NUL-terminated message on a session, from `pending` (bytes read earlier)
/// or the socket; `None` once clamd has closed the connection with nothing pending.
/// Waits at most `timeout` from `started` in all.
fn next_message(
    s: &mut UnixStream,
    pending: &mut Vec<u8>,
    started: Instant,
    timeout: Option<Duration>,
) -> Result<Option<String>, ScanError> {
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = pending.iter().position(|&b| b == 0) {
            let msg = String::from_utf8_lossy(&pending[..end]).into_owned();
            pending.drain(..=end);
            return Ok(Some(msg));
        }
        if let Some(t) = timeout
            && started.elapsed() >= t
        {
            return Err(ScanError::Timeout(t));
        }
        if !wait_readable(s, timeout.map(|t| t.saturating_sub(started.elapsed())))? {
            return Err(ScanError::Timeout(timeout.unwrap_or(COMMAND_TIMEOUT)));
        }
        // clamd closing with the `VERSION` still unread resets the connection: to this
        // side that is the same end of the session as a plain close.
        let read = match s.read(&mut buf) {
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Ok(0),
            other => other,
        };
        match read {
            Ok(0) if pending.is_empty() => return Ok(None),
            // An unterminated last message: what clamd sent before closing.
            Ok(0) => {
                let msg = String::from_utf8_lossy(pending).into_owned();
                pending.clear();
                return Ok(Some(msg));
            }
            Ok(n) => {
                pending.extend_from_slice(&buf[..n]);
                if pending.len() > 64 * 1024 {
                    return Err(ScanError::Failed("clamd reply is implausibly long".into()));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if is_timeout(&e) => {
                return Err(ScanError::Timeout(timeout.unwrap_or(COMMAND_TIMEOUT)));
            }
            Err(e) => return Err(ScanError::Failed(format!("reading clamd reply: {e}"))),
        }
    }
}

/// Waits until `s` has something to read (or is closed), at most `left`: `false`
/// when the time ran out.
///
/// A blocking `read` on a unix socket also wakes each time clamd takes one of the
/// commands sent before it (the socket's send buffer draining wakes every sleeper on
/// it), and goes back to sleep: two or three needless switches per scan. `poll` for
/// input sleeps through those.
fn wait_readable(s: &UnixStream, left: Option<Duration>) -> Result<bool, ScanError> {
    let ts = left.map(|l| rustix::time::Timespec {
        tv_sec: l.as_secs().min(i64::MAX as u64) as i64,
        tv_nsec: l.subsec_nanos().into(),
    });
    loop {
        let mut fds = [rustix::event::PollFd::new(s, rustix::event::PollFlags::IN)];
        match rustix::event::poll(&mut fds, ts.as_ref()) {
            Ok(n) => return Ok(n > 0),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(ScanError::Failed(format!("waiting for clamd: {e}"))),
        }
    }
}

/// The signature database in a `VERSION` reply: `ClamAV 1.4.6/27450/Mon Nov 24
/// 08:00:00 2026` (engine/database version/database date, the date in UTC). A reply
/// without the database part (`ClamAV 1.4.6`: only undated databases loaded) or with
/// an unreadable date gives `updated: None`.
pub fn parse_signatures(version: &str) -> super::Signatures {
    let mut parts = version.splitn(3, '/');
    let _engine = parts.next();
    let db = parts.next().map(str::trim).unwrap_or("").to_string();
    let updated = parts.next().and_then(|d| {
        // The weekday is left out: it adds nothing, and must not make a date that
        // names the wrong one unreadable.
        let d = d.split_whitespace().skip(1).collect::<Vec<_>>().join(" ");
        chrono::NaiveDateTime::parse_from_str(&d, "%b %d %H:%M:%S %Y")
            .ok()
            .map(|t| {
                t.and_utc()
                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            })
    });
    super::Signatures {
        version: if db.is_empty() { "none".into() } else { db },
        updated,
    }
}

/// The parts of a clamd.conf that decide what clamd scans whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClamdLimits {
    pub local_socket: Option<std::path::PathBuf>,
    pub alert_exceeds_max: bool,
    pub max_file_size: u64,
    pub max_scan_size: u64,
    pub max_recursion: u64,
    pub max_files: u64,
    pub stream_max_length: u64,
}

impl ClamdLimits {
    /// What clamd uses for a key its configuration does not set (clamd.conf(5)).
    pub const COMPILED_IN: ClamdLimits = ClamdLimits {
        local_socket: None,
        alert_exceeds_max: false,
        max_file_size: 100 << 20,
        max_scan_size: 400 << 20,
        max_recursion: 17,
        max_files: 10_000,
        stream_max_length: 100 << 20,
    };

    /// Reads a clamd.conf; clamd's defaults for what it does not set.
    pub fn read(conf: &Path) -> io::Result<ClamdLimits> {
        let text = std::fs::read_to_string(conf)?;
        let mut l = ClamdLimits {
            local_socket: None,
            alert_exceeds_max: false,
            ..ClamdLimits::COMPILED_IN
        };
        for line in text.lines() {
            let mut parts = line.split_whitespace();
            let (Some(key), Some(value)) = (parts.next(), parts.next()) else {
                continue;
            };
            match key {
                "LocalSocket" => l.local_socket = Some(value.into()),
                "AlertExceedsMax" => {
                    l.alert_exceeds_max =
                        matches!(value.to_ascii_lowercase().as_str(), "yes" | "true")
                }
                "MaxFileSize" => l.max_file_size = parse_size(value).unwrap_or(l.max_file_size),
                "MaxScanSize" => l.max_scan_size = parse_size(value).unwrap_or(l.max_scan_size),
                "MaxRecursion" => l.max_recursion = value.parse().unwrap_or(l.max_recursion),
                "MaxFiles" => l.max_files = value.parse().unwrap_or(l.max_files),
                "StreamMaxLength" => {
                    l.stream_max_length = parse_size(value).unwrap_or(l.stream_max_length)
                }
                _ => {}
            }
        }
        Ok(l)
    }

    /// The largest file clamd scans whole (0 in clamd.conf means no limit).
    pub fn largest_scanned(&self) -> Option<u64> {
        [self.max_file_size, self.max_scan_size]
            .into_iter()
            .filter(|&v| v > 0)
            .min()
    }
}

/// clamd.conf sizes: `100M`, `1G`, `512k`, or bytes.
fn parse_size(v: &str) -> Option<u64> {
    let (num, mult) = match v.chars().last()? {
        'k' | 'K' => (&v[..v.len() - 1], 1 << 10),
        'm' | 'M' => (&v[..v.len() - 1], 1 << 20),
        'g' | 'G' => (&v[..v.len() - 1], 1 << 30),
        _ => (v, 1),
    };
    num.parse::<u64>().ok().map(|n| n.saturating_mul(mult))
}

/// What clamd reports (with `AlertExceedsMax yes`) for a file it could not scan whole.
const LIMITS_EXCEEDED: &str = "Heuristics.Limits.Exceeded";

/// Parses a scan reply: `fd[7]: OK`, `stream: Eicar-Signature FOUND`, `... ERROR`.
/// Anything that is not clearly clean or clearly a detection is an error.
pub fn parse_reply(reply: &str) -> Result<Verdict, ScanError> {
    let mut detections = Vec::new();
    let mut limits = Vec::new();
    let mut clean = false;
    let lines: Vec<&str> = reply
        .split(['\0', '\n'])
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if lines.is_empty() {
        return Err(ScanError::Failed("empty reply from clamd".into()));
    }
    for line in lines {
        if let Some(body) = line.strip_suffix(" FOUND") {
            let name = body.split_once(": ").map(|(_, n)| n).unwrap_or(body).trim();
            if name.is_empty() {
                return Err(ScanError::Failed(format!(
                    "clamd reported a detection without a name: {line:?}"
                )));
            }
            if name.starts_with(LIMITS_EXCEEDED) {
                limits.push(name.to_string());
            } else {
                detections.push(name.to_string());
            }
        } else if line.ends_with(" ERROR") {
            return Err(ScanError::Rejected(format!("clamd: {line}")));
        } else if line.ends_with(": OK") {
            clean = true;
        } else {
            return Err(ScanError::Failed(format!(
                "unrecognised clamd reply: {line:?}"
            )));
        }
    }
    if !detections.is_empty() {
        Ok(Verdict::Suspect(detections))
    } else if !limits.is_empty() {
        Err(ScanError::Unscannable(format!(
            "clamd reported a scan limit hit ({})",
            limits.join(", ")
        )))
    } else if clean {
        Ok(Verdict::Clean)
    } else {
        Err(ScanError::Failed(format!(
            "unrecognised clamd reply: {reply:?}"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_dates() {
        let s = parse_signatures("ClamAV 1.4.6/27450/Mon Nov 24 08:00:00 2026");
        assert_eq!(s.version, "27450");
        assert_eq!(s.updated.as_deref(), Some("2026-11-24T08:00:00Z"));
        // clamd pads single-digit days with a space.
        let s = parse_signatures("ClamAV 1.4.6/27450/Tue Dec  1 08:00:00 2026");
        assert_eq!(s.updated.as_deref(), Some("2026-12-01T08:00:00Z"));
        let s = parse_signatures("ClamAV 1.4.6");
        assert_eq!((s.version.as_str(), s.updated), ("none", None));
        assert_eq!(parse_signatures("ClamAV 1.4.6/0/garbage").updated, None);
    }

    #[test]
    fn replies() {
        assert_eq!(parse_reply("fd[5]: OK\0"), Ok(Verdict::Clean));
        assert_eq!(parse_reply("stream: OK"), Ok(Verdict::Clean));
        assert_eq!(
            parse_reply("fd[5]: Eicar-Test-Signature FOUND\0"),
            Ok(Verdict::Suspect(vec!["Eicar-Test-Signature".into()]))
        );
        assert!(parse_reply("INSTREAM size limit exceeded. ERROR\0").is_err());
        assert!(parse_reply("fd[5]: lstat() failed: No such file. ERROR").is_err());
        assert!(parse_reply("").is_err());
        assert!(parse_reply("fd[5]: MAYBE").is_err());
        // A file too large for clamd's limits is unscannable, never clean nor suspect.
        assert!(matches!(
            parse_reply("fd[5]: Heuristics.Limits.Exceeded.MaxFileSize FOUND\0"),
            Err(ScanError::Unscannable(_))
        ));
        assert!(parse_reply("fd[5]: OK\0fd[5]: Heuristics.Limits.Exceeded FOUND\0").is_err());
        // A real detection next to a limit is still a detection.
        assert_eq!(
            parse_reply("fd[5]: Heuristics.Limits.Exceeded FOUND\0fd[5]: Win.Trojan FOUND\0"),
            Ok(Verdict::Suspect(vec!["Win.Trojan".into()]))
        );
    }
}

#[cfg(test)]
mod session_tests {
    use super::*;

    /// A session to a stand-in that reads `VERSION`, `FILDES` + descriptor and
    /// writes `replies` (then closes if `close`). The session's next id is 7: the
    /// `VERSION` is 7, the scan 8.
    fn exchange(replies: &'static [u8], close: bool) -> SessionReply<(String, Option<String>)> {
        let (ours, mut theirs) = UnixStream::pair().expect("socketpair");
        let clamd = std::thread::spawn(move || {
            // "zVERSION\0", "zFILDES\0", the byte carrying the descriptor.
            let mut got = vec![0u8; 9 + 8 + 1];
            theirs.read_exact(&mut got).expect("commands");
            assert_eq!(&got[..17], b"zVERSION\0zFILDES\0");
            theirs.write_all(replies).expect("replies");
            if !close {
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        let av = ClamAv::new(
            ClamdEndpoint::Unix("/nonexistent".into()),
            Duration::from_secs(5),
        );
        let s = Session {
            sock: ours,
            next_id: 7,
            opened: Instant::now(),
            read_timeout: None,
        };
        let file = File::open("/dev/null").expect("/dev/null");
        let out = av.session_scan(s, &file, Some(Duration::from_secs(5)));
        clamd.join().expect("stand-in");
        out
    }

    #[test]
    fn version_and_scan_are_matched_by_id_whatever_their_order() {
        match exchange(
            b"8: fd[3]: OK\x007: ClamAV 1.4.6/27450/Sat Dec  5 08:00:00 2026\0",
            false,
        ) {
            SessionReply::Reply((scan, version), s) => {
                assert_eq!(scan, "fd[3]: OK");
                assert_eq!(
                    version.as_deref(),
                    Some("ClamAV 1.4.6/27450/Sat Dec  5 08:00:00 2026")
                );
                assert_eq!(s.next_id, 9);
            }
            _ => panic!("a clean scan with its version leaves the session reusable"),
        }
    }

    #[test]
    fn a_detection_then_a_closed_session_has_no_version_and_is_not_reused() {
        match exchange(b"8: fd[3]: Eicar-Signature FOUND\0", true) {
            SessionReply::Final(Ok((scan, None))) => {
                assert_eq!(scan, "fd[3]: Eicar-Signature FOUND")
            }
            _ => panic!("expected the detection, without a version, session dropped"),
        }
    }

    #[test]
    fn a_scan_reply_inside_the_version_reply_is_untangled() {
        // clamd wrote "7: ", then the scan thread "8: fd[3]: OK\0", then the version.
        match exchange(
            b"7: 8: fd[3]: OK\0ClamAV 1.4.6/27450/Sat Dec  5 08:00:00 2026\0",
            false,
        ) {
            SessionReply::Final(Ok((scan, Some(v)))) => {
                assert_eq!(scan, "fd[3]: OK");
                assert!(v.starts_with("ClamAV 1.4.6/27450/"), "{v}");
            }
            _ => panic!("both replies are clamd's; the session is not reused after"),
        }
    }

    #[test]
    fn an_untagged_version_otherwise_is_an_error() {
        assert!(matches!(
            exchange(
                b"8: fd[3]: OK\0ClamAV 1.4.6/27450/Sat Dec  5 08:00:00 2026\0",
                true
            ),
            SessionReply::Final(Err(ScanError::Failed(_)))
        ));
    }

    #[test]
    fn a_reply_with_a_foreign_id_is_an_error() {
        match exchange(b"3: fd[3]: OK\0", true) {
            SessionReply::Final(Err(ScanError::Failed(m))) => {
                assert!(m.contains("expected ids 7 and 8"), "{m}")
            }
            _ => panic!("a reply to another command must not be taken as this scan's"),
        }
    }

    #[test]
    fn nothing_at_all_is_a_broken_session() {
        assert!(matches!(exchange(b"", true), SessionReply::Broken(_)));
    }
}
