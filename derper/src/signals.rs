//! SIGHUP as a stream every reloader can wait on (certificates, mesh peers, rate limits each
//! hold their own subscription, so one signal reaches all of them).

/// Waits for SIGHUP; where signals are unavailable it simply never fires.
pub struct Hangups {
    #[cfg(unix)]
    inner: Option<tokio::signal::unix::Signal>,
}

impl Hangups {
    pub fn new() -> Self {
        Hangups {
            #[cfg(unix)]
            inner: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok(),
        }
    }

    pub async fn recv(&mut self) {
        #[cfg(unix)]
        if let Some(s) = self.inner.as_mut() {
            s.recv().await;
            return;
        }
        std::future::pending::<()>().await
    }
}

impl Default for Hangups {
    fn default() -> Self {
        Self::new()
    }
}
