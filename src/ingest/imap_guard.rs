//! The read side of an IMAP connection, guarded against two server faults that per-read timeouts
//! and async-imap do not catch (reliability.md D6):
//!
//! - **Oversized literals.** async-imap buffers a whole response, literal included, up to 512 MiB
//!   before parsing it, and a server may announce any `{N}` whatever RFC822.SIZE said. Every
//!   literal announcement in the byte stream is checked against the size limit *before* its
//!   content is read, so memory stays bounded by the limit.
//! - **Drip feeds.** A server that sends one byte per second never trips a per-read timeout.
//!   While the read timeout is on, the time spent waiting for data is added up; each time it
//!   reaches the timeout, at least `MIN_BYTES_PER_WINDOW` must have arrived meanwhile, or the
//!   read fails with `TimedOut`. Time spent not reading (normalizing, committing) does not count,
//!   and IDLE (read timeout off) is exempt, so quiet but healthy links are never cut.
//!
//! It also answers one LOGIN itself after a `PREAUTH` greeting (`answer_login_locally`):
//! async-imap makes a `Session` only out of a successful LOGIN or AUTHENTICATE, and a server
//! that is already authenticated must not receive either (RFC 9051 §7.1.4).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes that must arrive per read-timeout's worth of waiting (about 8 bytes/s at 30 s).
const MIN_BYTES_PER_WINDOW: u64 = 256;
/// Digits accepted in a literal announcement (u64 fits in 20).
const MAX_LITERAL_DIGITS: u8 = 20;

/// Where the scanner is in the server's byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scan {
    /// Ordinary response text.
    Text,
    /// After `{`, reading digits.
    Digits { value: u64, digits: u8 },
    /// After `{N}`, expecting CR.
    Closed(u64),
    /// After `{N}\r`, expecting LF.
    Cr(u64),
    /// Inside a literal: this many content bytes left.
    Literal(u64),
}

/// A stream whose reads enforce a literal size limit and a minimum data rate.
#[derive(Debug)]
pub struct Guarded<S> {
    inner: S,
    max_literal: u64,
    scan: Scan,
    /// The read timeout, or None while idling (rate check off).
    window: Option<Duration>,
    /// Time spent waiting for data in the current window, and the bytes that came.
    waited: Duration,
    bytes: u64,
    /// When the pending read started waiting.
    waiting_since: Option<Instant>,
    /// The LOGIN this stream answers itself instead of the server (PREAUTH).
    local_login: LocalLogin,
}

/// The one LOGIN command answered without the server, after a `PREAUTH` greeting.
#[derive(Debug, Default)]
enum LocalLogin {
    /// Everything goes to the server.
    #[default]
    Off,
    /// Collecting the LOGIN line (never sent: it carries no credentials worth sending anyway).
    Collecting(Vec<u8>),
    /// The tagged OK to hand to the reader, and how much of it was handed already.
    Answering(Vec<u8>, usize),
}

impl<S> Guarded<S> {
    /// Wraps `inner`: literals over `max_literal` bytes are refused, and less than
    /// `MIN_BYTES_PER_WINDOW` per `timeout` of waiting is a timeout.
    pub fn new(inner: S, max_literal: u64, timeout: Duration) -> Self {
        Guarded {
            inner,
            max_literal,
            scan: Scan::Text,
            window: Some(timeout),
            waited: Duration::ZERO,
            bytes: 0,
            waiting_since: None,
            local_login: LocalLogin::Off,
        }
    }

    /// The next command written must be a LOGIN; it is not sent, and the reader gets a tagged OK
    /// for it instead. For a server that greeted with PREAUTH.
    pub fn answer_login_locally(&mut self) {
        self.local_login = LocalLogin::Collecting(Vec::new());
    }

    /// Takes in bytes of the command that is answered locally; errs unless it is a LOGIN.
    fn collect_login(&mut self, buf: &[u8]) -> io::Result<()> {
        let LocalLogin::Collecting(line) = &mut self.local_login else {
            return Ok(());
        };
        line.extend_from_slice(buf);
        let Some(end) = line.windows(2).position(|w| w == b"\r\n") else {
            return Ok(());
        };
        let text = String::from_utf8_lossy(&line[..end]).into_owned();
        let mut words = text.split(' ');
        let tag = words.next().unwrap_or_default().to_string();
        if !words
            .next()
            .is_some_and(|w| w.eq_ignore_ascii_case("LOGIN"))
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "only a LOGIN can be answered locally after PREAUTH",
            ));
        }
        let answer = format!("{tag} OK already authenticated (PREAUTH)\r\n").into_bytes();
        self.local_login = LocalLogin::Answering(answer, 0);
        Ok(())
    }

    /// The wrapped stream.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the stream (STARTTLS), dropping the scanner state with whatever was read.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// Turns the rate check on (`Some(read timeout)`) or off (`None`, while idling).
    pub fn set_window(&mut self, window: Option<Duration>) {
        self.window = window;
        self.waited = Duration::ZERO;
        self.bytes = 0;
        self.waiting_since = None;
    }

    /// Feeds bytes the server sent through the literal scanner.
    fn scan(&mut self, data: &[u8]) -> io::Result<()> {
        let mut i = 0;
        while i < data.len() {
            match self.scan {
                Scan::Literal(left) => {
                    let take = (data.len() - i).min(usize::try_from(left).unwrap_or(usize::MAX));
                    i += take;
                    let left = left - take as u64;
                    self.scan = if left == 0 {
                        Scan::Text
                    } else {
                        Scan::Literal(left)
                    };
                    continue;
                }
                Scan::Text => {
                    // skip to the next brace: the common case is one memchr-like pass
                    match data[i..].iter().position(|&b| b == b'{') {
                        Some(p) => {
                            i += p + 1;
                            self.scan = Scan::Digits {
                                value: 0,
                                digits: 0,
                            };
                        }
                        None => i = data.len(),
                    }
                    continue;
                }
                Scan::Digits { value, digits } => {
                    let b = data[i];
                    self.scan = match b {
                        b'0'..=b'9' if digits < MAX_LITERAL_DIGITS => Scan::Digits {
                            value: value.saturating_mul(10).saturating_add(u64::from(b - b'0')),
                            digits: digits + 1,
                        },
                        b'}' if digits > 0 => Scan::Closed(value),
                        b'{' => Scan::Digits {
                            value: 0,
                            digits: 0,
                        },
                        _ => Scan::Text,
                    };
                }
                Scan::Closed(n) => {
                    self.scan = if data[i] == b'\r' {
                        Scan::Cr(n)
                    } else {
                        Scan::Text
                    };
                }
                Scan::Cr(n) => {
                    if data[i] != b'\n' {
                        self.scan = Scan::Text;
                        continue;
                    }
                    if n > self.max_literal {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!(
                                "server announced a literal of {n} bytes, over the limit of {} bytes",
                                self.max_literal
                            ),
                        ));
                    }
                    self.scan = if n == 0 { Scan::Text } else { Scan::Literal(n) };
                }
            }
            i += 1;
        }
        Ok(())
    }

    /// Accounts for a completed read of `n` bytes; errs when the data came too slowly.
    fn account(&mut self, n: usize) -> io::Result<()> {
        let Some(window) = self.window else {
            return Ok(());
        };
        if let Some(since) = self.waiting_since.take() {
            self.waited += since.elapsed();
        }
        self.bytes += n as u64;
        if self.waited >= window {
            if self.bytes < MIN_BYTES_PER_WINDOW {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "server too slow: {} bytes in {:.1}s of waiting",
                        self.bytes,
                        self.waited.as_secs_f64()
                    ),
                ));
            }
            self.waited = Duration::ZERO;
            self.bytes = 0;
        }
        Ok(())
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let LocalLogin::Answering(answer, sent) = &mut this.local_login {
            let n = (answer.len() - *sent).min(buf.remaining());
            buf.put_slice(&answer[*sent..*sent + n]);
            *sent += n;
            if *sent == answer.len() {
                this.local_login = LocalLogin::Off;
            }
            return Poll::Ready(Ok(()));
        }
        let start = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Pending => {
                if this.window.is_some() && this.waiting_since.is_none() {
                    this.waiting_since = Some(Instant::now());
                }
                Poll::Pending
            }
            Poll::Ready(Ok(())) => {
                let n = buf.filled().len() - start;
                this.account(n)?;
                this.scan(&buf.filled()[start..])?;
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => {
                this.waiting_since = None;
                Poll::Ready(Err(e))
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if matches!(self.local_login, LocalLogin::Collecting(_)) {
            self.collect_login(buf)?;
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_all(max: u64, chunks: &[&[u8]]) -> io::Result<Scan> {
        let mut g = Guarded::new((), max, Duration::from_secs(1));
        for c in chunks {
            g.scan(c)?;
        }
        Ok(g.scan)
    }

    #[test]
    fn literals_within_the_limit_pass_and_their_content_is_skipped() {
        // the literal's content holds a fake oversized announcement: it must not count
        let s = scan_all(
            100,
            &[
                b"* 1 FETCH (UID 5 BODY[] {20}\r\n",
                b"x{999999}\r\nabcdef",
                b")\r\n",
            ],
        )
        .unwrap();
        assert_eq!(s, Scan::Text);
    }

    #[test]
    fn an_oversized_announcement_is_refused_even_split_across_reads() {
        let err = scan_all(1000, &[b"* 1 FETCH (BODY[] {52", b"428800}\r", b"\n"]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("52428800"), "{err}");
    }

    #[test]
    fn braces_that_are_not_literals_are_ignored() {
        for text in [&b"* OK {abc}\r\n"[..], b"* OK {}\r\n", b"* OK {5} x\r\n"] {
            assert_eq!(scan_all(1, &[text]).unwrap(), Scan::Text);
        }
        assert_eq!(
            scan_all(10, &[b"{{7}\r\n"]).unwrap(),
            Scan::Literal(7),
            "a brace restarts the scan"
        );
        assert!(scan_all(10, &[b"{99999999999999999999999}\r\n"]).is_ok_and(|s| s == Scan::Text));
    }

    #[tokio::test]
    async fn a_login_after_preauth_is_answered_without_the_server() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (client, mut server) = tokio::io::duplex(1024);
        let mut g = Guarded::new(client, 1000, Duration::from_secs(1));
        g.answer_login_locally();
        g.write_all(b"A1 LOGIN \"u\" ").await.unwrap();
        g.write_all(b"\"p\"\r\n").await.unwrap();
        let mut answer = [0u8; 64];
        let n = g.read(&mut answer).await.unwrap();
        assert_eq!(&answer[..n], b"A1 OK already authenticated (PREAUTH)\r\n");
        // what follows goes to the server again, and the server saw nothing before it
        g.write_all(b"A2 CAPABILITY\r\n").await.unwrap();
        let n = server.read(&mut answer).await.unwrap();
        assert_eq!(&answer[..n], b"A2 CAPABILITY\r\n");

        let (client, _server) = tokio::io::duplex(1024);
        let mut g = Guarded::new(client, 1000, Duration::from_secs(1));
        g.answer_login_locally();
        let err = g.write_all(b"A1 SELECT INBOX\r\n").await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn slow_data_times_out_and_fast_data_does_not() {
        let mut g = Guarded::new((), 10, Duration::from_millis(100));
        g.waited = Duration::from_millis(150);
        assert_eq!(g.account(3).unwrap_err().kind(), io::ErrorKind::TimedOut);

        let mut g = Guarded::new((), 10, Duration::from_millis(100));
        g.waited = Duration::from_millis(150);
        g.account(4096).unwrap();
        assert_eq!((g.waited, g.bytes), (Duration::ZERO, 0), "a new window");

        let mut g = Guarded::new((), 10, Duration::from_millis(100));
        g.set_window(None);
        g.waited = Duration::from_secs(60);
        g.account(1).unwrap();
    }
}
