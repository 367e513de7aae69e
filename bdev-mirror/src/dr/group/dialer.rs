//! The group's dialer thread: (re)connects to the DR site and authenticates, off the group's
//! thread, so a slow or absent DR site never holds up host writes.

use super::*;
use crate::dr::link::authenticate;

/// Dials the DR site whenever the group wants a connection, with backoff (100 ms to 2 s).
pub(super) fn spawn_dialer(
    settings: &DrGroupSettings,
    shared: Arc<GroupShared>,
    want: Arc<AtomicBool>,
    tx: mpsc::Sender<(std::net::TcpStream, Vec<u8>)>,
) -> std::io::Result<()> {
    let (name, addr, secret) = (settings.name.clone(), settings.dr_site, settings.secret.clone());
    std::thread::Builder::new().name(format!("dr-dial-{name}")).spawn(move || {
        let mut backoff = Duration::from_millis(100);
        let mut last_log: Option<Instant> = None;
        while !shared.stop.load(Ordering::Acquire) {
            if !want.load(Ordering::Acquire) {
                std::thread::park_timeout(Duration::from_millis(50));
                continue;
            }
            let attempt = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).and_then(|mut s| {
                let early = authenticate(&mut s, &secret, crate::mirror::auth::Side::Dialer)?;
                Ok((s, early))
            });
            match attempt {
                Ok(conn) => {
                    want.store(false, Ordering::Release);
                    backoff = Duration::from_millis(100);
                    if tx.send(conn).is_err() {
                        return;
                    }
                    let _ = shared.waker.wake();
                }
                Err(e) => {
                    if last_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                        tracing::warn!(group = %name, dr_site = %addr, "cannot reach the DR site: {e}");
                        last_log = Some(Instant::now());
                    }
                    std::thread::park_timeout(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    })?;
    Ok(())
}
