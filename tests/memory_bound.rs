//! The server-wide payload budget is enforced: with `--max-buffer-mib 3`, a client pipelining
//! ten 1 MiB FUA writes against a store whose flush hangs gets exactly three of them admitted
//! (received and applied); the server stops reading the socket until one completes, and every
//! write completes once the store recovers. Drives `transmit::serve` over an in-memory stream.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nbdcrypt::protocol::Request;
use nbdcrypt::protocol::consts::{cmd, cmd_flag};
use nbdcrypt::server::Export;
use nbdcrypt::server::buffers::BufferPool;
use nbdcrypt::server::negotiate::Session;
use nbdcrypt::server::pipeline::Resources;
use nbdcrypt::server::transmit;
use nbdcrypt::server::workers::Workers;
use nbdcrypt::storage::{Extent, MemoryStorage, Storage};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MIB: usize = 1 << 20;

/// Memory storage whose `sync` waits until the gate opens, counting writes.
#[derive(Debug, Default)]
struct GatedStore {
    mem: MemoryStorage,
    writes: AtomicUsize,
    open: Mutex<bool>,
    opened: Condvar,
}

impl GatedStore {
    fn open_gate(&self) {
        *self.open.lock().unwrap() = true;
        self.opened.notify_all();
    }
}

/// Opens the gate when dropped, so a failing assertion cannot leave blocked flushes behind
/// (the runtime would wait for them forever instead of reporting the failure).
struct OpenOnDrop(Arc<GatedStore>);

impl Drop for OpenOnDrop {
    fn drop(&mut self) {
        self.0.open_gate();
    }
}

impl Storage for GatedStore {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.mem.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.mem.write_at(buf, offset)
    }
    fn sync(&self) -> std::io::Result<()> {
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.opened.wait(open).unwrap();
        }
        Ok(())
    }
    fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.mem.punch_hole(offset, len)
    }
    fn extents(&self, offset: u64, len: u64) -> std::io::Result<Vec<Extent>> {
        self.mem.extents(offset, len)
    }
    fn size(&self) -> std::io::Result<u64> {
        self.mem.size()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_budget_admits_only_what_fits_and_all_complete_later() {
    let store = Arc::new(GatedStore::default());
    let _unblock = OpenOnDrop(Arc::clone(&store));
    let volume = common::test_volume(Box::new(Arc::clone(&store)), 16 << 20, 4096);
    let export = Arc::new(Export::new("b".into(), String::new(), volume));
    let session = Session {
        export,
        structured: false,
        block_status: false,
    };
    let buffers = BufferPool::new(3 * MIB);
    let resources = Resources {
        workers: Arc::new(Workers::new(2, 128 * 1024).unwrap()),
        buffers: Arc::clone(&buffers),
    };
    let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (client, server_side) = tokio::io::duplex(64 * 1024);
    let server = tokio::spawn(transmit::serve(server_side, session, resources, stop_rx));

    let (mut rd, mut wr) = tokio::io::split(client);
    let sent = Arc::new(AtomicUsize::new(0));
    let sent2 = Arc::clone(&sent);
    let writer = tokio::spawn(async move {
        let payload = vec![0x5au8; MIB];
        for i in 0..10u64 {
            let mut hdr = Vec::new();
            Request {
                flags: cmd_flag::FUA,
                kind: cmd::WRITE,
                cookie: i,
                offset: i * MIB as u64,
                length: 1 << 20,
            }
            .encode(&mut hdr);
            wr.write_all(&hdr).await.unwrap();
            wr.write_all(&payload).await.unwrap();
            sent2.fetch_add(1, Ordering::SeqCst);
        }
        wr
    });

    // Exactly three writes are admitted; the server then stops reading.
    let start = Instant::now();
    while store.writes.load(Ordering::SeqCst) < 3 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "writes never started"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        store.writes.load(Ordering::SeqCst),
        3,
        "more admitted than the budget"
    );
    assert!(
        sent.load(Ordering::SeqCst) < 10,
        "the client could send everything: the server kept reading"
    );
    assert_eq!(buffers.budget().available_permits(), 0);

    // The store recovers: every write completes and is acknowledged.
    store.open_gate();
    let mut acked = Vec::new();
    for _ in 0..10 {
        let mut reply = [0u8; 16];
        rd.read_exact(&mut reply).await.unwrap();
        assert_eq!(&reply[4..8], &[0, 0, 0, 0], "write failed");
        acked.push(u64::from_be_bytes(reply[8..16].try_into().unwrap()));
    }
    acked.sort_unstable();
    assert_eq!(acked, (0..10).collect::<Vec<_>>());
    assert_eq!(store.writes.load(Ordering::SeqCst), 10);
    let mut wr = writer.await.unwrap();
    let mut disc = Vec::new();
    Request {
        flags: 0,
        kind: cmd::DISC,
        cookie: 99,
        offset: 0,
        length: 0,
    }
    .encode(&mut disc);
    wr.write_all(&disc).await.unwrap();
    let (end, _) = server.await.unwrap();
    assert!(matches!(end, transmit::End::Clean), "{end:?}");
    assert_eq!(buffers.budget().available_permits(), 3 * MIB);
}
