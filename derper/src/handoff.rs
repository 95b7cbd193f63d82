//! Handing the public port to a successor (`--reuse-port`): a new derper binds the same ports
//! beside this one, and shutdown waits until it listens before it closes ours and moves the
//! clients, so their reconnect lands on the successor instead of on nobody.
//!
//! The successor is found in `/proc/net/tcp{,6}` (LISTEN sockets on our port other than ours),
//! not by asking it: the two derpers share nothing but the port, and only the kernel knows
//! both sockets.

use std::time::Duration;

use tokio::time::Instant;

/// How often shutdown looks for a successor while it waits.
const POLL: Duration = Duration::from_millis(20);

/// TCP state LISTEN in `/proc/net/tcp`.
const TCP_LISTEN: &str = "0A";

/// Inodes of the listening sockets on `port` in one `/proc/net/tcp` or `/proc/net/tcp6` text.
pub fn listening_inodes(proc_net_tcp: &str, port: u16) -> Vec<u64> {
    proc_net_tcp
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local = f.get(1)?;
            let state = f.get(3)?;
            let inode = f.get(9)?.parse::<u64>().ok()?;
            let p = u16::from_str_radix(local.rsplit_once(':')?.1, 16).ok()?;
            (*state == TCP_LISTEN && p == port && inode != 0).then_some(inode)
        })
        .collect()
}

/// The inode of the socket behind `fd` (`socket:[N]` in `/proc/self/fd`).
#[cfg(target_os = "linux")]
pub fn socket_inode(fd: std::os::fd::RawFd) -> Option<u64> {
    let target = std::fs::read_link(format!("/proc/self/fd/{fd}")).ok()?;
    let t = target.to_str()?;
    t.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
}

#[cfg(not(target_os = "linux"))]
pub fn socket_inode(_fd: i32) -> Option<u64> {
    None
}

/// How many other sockets listen on `port` in this network namespace right now.
pub fn other_listeners(port: u16, own_inode: u64) -> usize {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .flat_map(|text| listening_inodes(&text, port))
        .filter(|i| *i != own_inode)
        .count()
}

/// Waits until another socket listens on `port`, at most `limit`; true if one does.
pub async fn wait_for_successor(port: u16, own_inode: u64, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if other_listeners(port, own_inode) > 0 {
            return true;
        }
        if Instant::now() + POLL > deadline {
            return false;
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 111 1 0000000000000000 100 0 0 10 0
   1: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 222 1 0000000000000000 100 0 0 10 0
   2: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 333 1 0000000000000000 20 4 30 10 -1
   3: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 444 1 0000000000000000 100 0 0 10 0
   4: garbage
";

    #[test]
    fn finds_listeners_on_the_port_only() {
        assert_eq!(listening_inodes(SAMPLE, 8080), vec![111, 222]);
        assert_eq!(listening_inodes(SAMPLE, 80), vec![444]);
        assert!(listening_inodes(SAMPLE, 443).is_empty());
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn sees_a_second_reuseport_listener_and_not_itself() {
        use std::os::fd::AsRawFd;
        let bind = || {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                .expect("socket");
            s.set_reuse_port(true).expect("SO_REUSEPORT");
            s
        };
        let a = bind();
        a.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .expect("bind");
        a.listen(8).expect("listen");
        let addr = a.local_addr().expect("addr").as_socket().expect("inet");
        let inode = socket_inode(a.as_raw_fd()).expect("inode of our socket");
        assert_eq!(other_listeners(addr.port(), inode), 0);
        let b = bind();
        b.bind(&addr.into()).expect("second bind on the same port");
        b.listen(8).expect("listen");
        assert_eq!(other_listeners(addr.port(), inode), 1);
        drop(b);
        assert_eq!(other_listeners(addr.port(), inode), 0);
    }
}
