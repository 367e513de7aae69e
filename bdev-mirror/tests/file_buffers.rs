//! The file bdev's channel reuses its I/O buffers: once it has seen its queue depth, reads and
//! writes allocate no aligned (DMA) buffer (this binary's global allocator counts them). Writes
//! go out from the caller's pooled buffer itself, which returns to its pool when the write is done.

use nvmetro_bdev::file::FileBdev;
use nvmetro_bdev::{Bdev, BdevChannel, BdevOp, BdevOutput, IoBufPool};
use nvmetro_ffi::CountingAllocator;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

fn run_batch(ch: &mut dyn BdevChannel, pool: &IoBufPool, depth: u64, round: u64) {
    for i in 0..depth {
        let offset = ((round * depth + i) % 128) * 8192;
        let op = if i % 2 == 0 {
            BdevOp::Write { offset, data: pool.copy_of(&[round as u8; 8192]), fua: false }
        } else {
            BdevOp::Read { offset, len: 8192 }
        };
        ch.submit(i, op);
    }
    let mut done = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while done.len() < depth as usize {
        ch.poll(&mut done);
        assert!(Instant::now() < deadline, "operations never completed");
    }
    for c in done {
        assert!(matches!(c.result, Ok(BdevOutput::Done | BdevOutput::Data(_))), "{:?}", c.result);
    }
}

#[test]
fn steady_state_reads_and_writes_allocate_no_dma_buffer() {
    let path = std::env::temp_dir().join(format!("nvmetro-file-buffers-{}", std::process::id()));
    let bdev = Arc::new(FileBdev::open("f", &path, 4096, Some(1 << 20), false).unwrap());
    let mut ch = bdev.clone().channel().unwrap();
    let pool = IoBufPool::new();
    run_batch(ch.as_mut(), &pool, 32, 0); // warm-up: the channel meets its queue depth
    let before = CountingAllocator::dma_allocations();
    for round in 1..=50 {
        run_batch(ch.as_mut(), &pool, 32, round);
    }
    let after = CountingAllocator::dma_allocations();
    drop(ch);
    let _ = std::fs::remove_file(&path);
    assert_eq!(after - before, 0, "1,600 operations at depth 32 after the warm-up allocated DMA buffers");
}
