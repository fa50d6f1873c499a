//! The client's submitted writes against the scripted server.

use std::sync::mpsc;
use std::time::Duration;

use super::*;
use crate::storage::{ReadDone, WriteData};

/// A payload of `len` bytes that differs from the export's pattern and between writes.
pub(crate) fn payload(seed: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| u8::try_from((i * 7 + seed) % 256).unwrap() ^ 0x5A)
        .collect()
}

/// A completion that reports whether the write was acknowledged and on which thread.
fn reporting(tx: &mpsc::Sender<(u64, bool, String)>, offset: u64) -> ReadDone {
    let tx = tx.clone();
    Box::new(move |acked: Option<&mut Vec<u8>>| {
        let thread = std::thread::current().name().unwrap_or("").to_owned();
        let _ = tx.send((offset, acked.is_some(), thread));
    })
}

/// Writes submitted without waiting go out whole, from the shared buffer (no copy is taken
/// before they are sent: the caller's bytes are what arrives), and each is acknowledged on the
/// reply reader thread; the export then holds every one of them.
#[test]
fn submitted_writes_arrive_whole_and_are_acknowledged_on_the_reader_thread() {
    let (uri, _) = serve(Script::RefuseLargeDf);
    let store = NbdStore::open(&uri).unwrap();
    let (tx, rx) = mpsc::channel();
    let mut written = Vec::new();
    for i in 0..120u64 {
        let (offset, len) = (i * 64 * 1024, 4096 * (1 + (i % 16) as usize));
        let data = payload(i, len);
        let shared: WriteData = std::sync::Arc::new(data.clone());
        assert!(
            store
                .submit_write(offset, shared, false, reporting(&tx, offset))
                .is_ok()
        );
        written.push((offset, data));
    }
    for _ in 0..written.len() {
        let (offset, acked, thread) = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("every submitted write completes");
        assert!(acked, "the write at {offset} was acknowledged");
        assert_eq!(thread, "nbdcrypt-upstream");
    }
    for (offset, data) in written {
        let mut back = vec![0u8; data.len()];
        store.read_at(&mut back, offset).unwrap();
        assert!(back == data, "{} bytes at {offset}", data.len());
    }
    // Past the export's end, or longer than one request: handed back, for the waiting write.
    let past: WriteData = std::sync::Arc::new(vec![0u8; 8192]);
    assert!(
        store
            .submit_write(SIZE - 4096, past, false, Box::new(|_| {}))
            .is_err()
    );
    // With FUA to an upstream that does not offer it (this one): handed back, for the waiting
    // write, which flushes.
    let fua: WriteData = std::sync::Arc::new(vec![0u8; 4096]);
    assert!(store.submit_write(0, fua, true, Box::new(|_| {})).is_err());
}

/// A write the upstream refuses is told so (`None`), and the same bytes sent again the waiting
/// way land.
#[test]
fn a_refused_submitted_write_is_told_it_failed() {
    let (uri, _) = serve(Script::FailFirstWrite);
    let store = NbdStore::open(&uri).unwrap();
    let (tx, rx) = mpsc::channel();
    let data = payload(9, 65536);
    let shared: WriteData = std::sync::Arc::new(data.clone());
    assert!(
        store
            .submit_write(8192, shared, false, reporting(&tx, 8192))
            .is_ok()
    );
    let (_, acked, _) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(!acked, "the refused write reported as failed");
    let mut back = vec![0u8; data.len()];
    store.read_at(&mut back, 8192).unwrap();
    assert!(back == expected(8192, data.len()), "nothing of it was kept");
    store.write_at(&data, 8192).unwrap();
    store.read_at(&mut back, 8192).unwrap();
    assert!(back == data);
}
