//! The client's reads against the scripted server.

use super::*;

#[test]
fn long_reads_ask_for_df_until_the_upstream_refuses_it_once() {
    let (uri, seen) = serve(Script::RefuseLargeDf);
    let store = NbdStore::open(&uri).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    store.read_at(&mut buf, 4096).unwrap();
    assert!(
        buf == expected(4096, buf.len()),
        "the retried read returns the data"
    );
    store.read_at(&mut buf, 1 << 20).unwrap();
    assert!(buf == expected(1 << 20, buf.len()));
    let mut small = vec![0u8; 65536];
    store.read_at(&mut small, 512).unwrap();
    assert!(small == expected(512, small.len()));
    let df = cmd_flag::DF;
    assert_eq!(
        *seen.lock().unwrap(),
        [(df, 1 << 20), (0, 1 << 20), (0, 1 << 20), (df, 65536)],
        "DF on the first long read; after its EOVERFLOW, long reads without DF; short reads keep it"
    );
}

#[test]
fn reads_recycle_their_buffers_and_stay_exact() {
    let (uri, _) = serve(Script::RefuseLargeDf);
    let store = NbdStore::open(&uri).unwrap();
    // Different lengths and offsets through the same recycled buffers: any byte the reply did
    // not send would show as a previous read's byte.
    for (i, len) in [65536usize, 4096, 65536, 512, 32768, 65536]
        .into_iter()
        .enumerate()
    {
        let offset = (i as u64 * 7 + 1) * 4096;
        let mut got = Vec::new();
        let done = store
            .read_in_place(offset, len, &mut |at, piece| {
                assert_eq!(at, got.len());
                got.extend_from_slice(piece);
            })
            .unwrap();
        assert!(done);
        assert!(
            got == expected(offset, len),
            "read {i}: {len} bytes at {offset}"
        );
    }
}

/// A reply that does not cover its request is a protocol violation: the read fails (the
/// connection is dropped and, the server doing it again, the request gives up), and never
/// hands on bytes the server did not send (a recycled buffer's old contents).
#[test]
fn a_read_reply_with_a_gap_or_an_overlap_fails_instead_of_returning_stale_bytes() {
    for (script, why) in [
        (Script::Gap, "left a gap"),
        (Script::Overlap, "overlapped itself"),
    ] {
        let (uri, _) = serve(script);
        let opts = crate::upstream::Options {
            timeout: std::time::Duration::from_millis(300),
            connections: 1,
        };
        let store = NbdStore::open_with(&uri, &opts).unwrap();
        let mut buf = vec![0xAAu8; 65536];
        let e = store.read_at(&mut buf, 0).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains(why) && text.contains("kept failing"),
            "{text}"
        );
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert!(buf.iter().all(|&b| b == 0xAA), "nothing was handed on");
    }
}

/// Reads submitted without waiting complete on the reply reader thread, in any order, each
/// with its own bytes (through recycled buffers), and nothing waits for them.
#[test]
fn submitted_reads_complete_on_the_reader_thread_with_their_own_bytes() {
    let (uri, _) = serve(Script::RefuseLargeDf);
    let store = NbdStore::open(&uri).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let count = 200u64;
    for i in 0..count {
        let (offset, len) = ((i * 37 % 2000) * 4096, 4096 * (1 + (i % 16) as usize));
        let tx = tx.clone();
        let done: crate::storage::ReadDone = Box::new(move |data: Option<&mut Vec<u8>>| {
            let thread = std::thread::current().name().unwrap_or("").to_owned();
            let _ = tx.send((offset, len, data.map(|d| d.clone()), thread));
        });
        assert!(
            store.submit_read(offset, len, done).is_ok(),
            "read {i} started"
        );
    }
    for _ in 0..count {
        let (offset, len, data, thread) = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("every submitted read completes");
        let data = data.expect("the read succeeded");
        assert_eq!(data.len(), len);
        assert!(data == expected(offset, len), "{len} bytes at {offset}");
        assert_eq!(thread, "nbdcrypt-upstream");
    }
    // Past the export's end or unaligned: handed back, for the waiting read.
    let noop: crate::storage::ReadDone = Box::new(|_| {});
    assert!(store.submit_read(SIZE - 4096, 8192, noop).is_err());
}

/// A submitted read whose connection dies before its reply is told so (`None`), and a read
/// submitted on the dead connection is handed back: nothing is left waiting forever.
#[test]
fn a_submitted_read_on_a_dying_connection_is_told_it_failed() {
    let (uri, _) = serve(Script::Hangup);
    let store = NbdStore::open(&uri).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let done: crate::storage::ReadDone = Box::new(move |data: Option<&mut Vec<u8>>| {
        let _ = tx.send(data.is_some());
    });
    assert!(store.submit_read(0, 4096, done).is_ok());
    let ok = rx
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("the read is completed when its connection dies");
    assert!(!ok, "a read the server never answered failed");
    let (tx, rx) = std::sync::mpsc::channel::<bool>();
    let done: crate::storage::ReadDone = Box::new(move |data: Option<&mut Vec<u8>>| {
        let _ = tx.send(data.is_some());
    });
    if let Err(back) = store.submit_read(0, 4096, done) {
        back(None);
    }
    assert_eq!(
        rx.recv_timeout(std::time::Duration::from_secs(10)),
        Ok(false),
        "handed back (or failed): never left waiting"
    );
}

/// The completion of a submitted read can hold the last reference to the store (a volume
/// dropped while its read was in flight): the store, and so the connection, is then dropped on
/// the reader thread itself, which must not wait for its own end.
#[test]
fn a_store_dropped_by_its_own_read_completion_shuts_down_cleanly() {
    // The reply comes after this thread has dropped its reference.
    let (uri, _) = serve(Script::Slow);
    let store = std::sync::Arc::new(NbdStore::open(&uri).unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    let last = std::sync::Arc::clone(&store);
    let done: crate::storage::ReadDone = Box::new(move |data: Option<&mut Vec<u8>>| {
        let ok = data.is_some();
        drop(last);
        let _ = tx.send(ok);
    });
    assert!(store.submit_read(0, 4096, done).is_ok());
    drop(store);
    assert_eq!(
        rx.recv_timeout(std::time::Duration::from_secs(10)),
        Ok(true),
        "the completion ran to its end after dropping the store"
    );
}
