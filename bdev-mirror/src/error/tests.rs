//! The error bdev's tests: rules selecting by kind and range, `after`, `fraction`, `count`,
//! ordering, delays and the wake descriptor, drops, live changes, JSON, and a property test that
//! every command completes once.

use super::*;
use crate::conformance::{check, run_to_completion};
use crate::malloc::MallocBdev;
use crate::{BdevCompletion, BdevError, BdevOp, BdevOutput};
use std::time::{Duration, Instant};

const BS: usize = 512;

fn device() -> Arc<ErrorBdev> {
    let inner: Arc<dyn Bdev> = Arc::new(MallocBdev::new("m", BS as u32, 1 << 20, false).unwrap());
    Arc::new(ErrorBdev::new("e", inner))
}

fn write(offset: u64) -> BdevOp {
    BdevOp::Write { offset, data: vec![0xab; BS].into(), fua: false }
}

fn read(offset: u64) -> BdevOp {
    BdevOp::Read { offset, len: BS }
}

#[test]
fn reads_into_an_offered_buffer_pass_fail_and_wait_by_the_rules() {
    let dev = device();
    crate::conformance::check_reads_into(dev.clone(), true);
    let mut ch = dev.clone().channel().unwrap();
    let pool = crate::IoBufPool::new();
    dev.control().set(vec![FaultRule { count: Some(1), ..FaultRule::fail(OpKind::Read, BdevError::Io("EIO".into())) }]).unwrap();
    let (got, _) = crate::conformance::read_into_buf(ch.as_mut(), 1, 8192, BS, pool.take(BS));
    assert_eq!(got, Err(BdevError::Io("EIO".into())), "the rule fires on a read offered a buffer");
    let (got, in_place) = crate::conformance::read_into_buf(ch.as_mut(), 2, 8192, BS, pool.take(BS));
    assert_eq!((got, in_place), (Ok(vec![0; BS]), true), "once spent, the rule lets reads through to the device");
    dev.control().set(vec![FaultRule { ops: OpKind::Read, delay: Some(Duration::from_millis(20)), ..FaultRule::default() }]).unwrap();
    let start = Instant::now();
    let (got, in_place) = crate::conformance::read_into_buf(ch.as_mut(), 3, 8192, BS, pool.take(BS));
    assert_eq!((got, in_place), (Ok(vec![0; BS]), true));
    assert!(start.elapsed() >= Duration::from_millis(20), "a delayed read waits its delay");
    assert_eq!(ch.outstanding(), 0);
}

/// Polls until `tag` completes or `limit` passes.
fn wait_for(ch: &mut dyn BdevChannel, tag: u64, limit: Duration) -> Option<BdevCompletion> {
    let until = Instant::now() + limit;
    let mut done = Vec::new();
    while Instant::now() < until {
        ch.poll(&mut done);
        if let Some(i) = done.iter().position(|c| c.tag == tag) {
            return Some(done.swap_remove(i));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    None
}

#[test]
fn passes_everything_through_without_rules() {
    let dev = device();
    assert_eq!(dev.info().name, "e");
    assert_eq!(dev.info().size_bytes(), 1 << 20);
    check(dev.clone());
    // With a rule that never selects anything, too.
    dev.control().set(vec![FaultRule { ops: OpKind::Flush, drop: true, ..FaultRule::default() }]).unwrap();
    let mut ch = dev.clone().channel().unwrap();
    assert_eq!(run_to_completion(ch.as_mut(), 1, write(0)), Ok(BdevOutput::Done));
    assert_eq!(dev.control().stats(), FaultStats::default());
}

#[test]
fn errors_only_in_range() {
    let dev = device();
    let rule = FaultRule { offset: Some(4096), len: Some(4096), ..FaultRule::fail(OpKind::Write, BdevError::NoSpace) };
    dev.control().set(vec![rule]).unwrap();
    let mut ch = dev.clone().channel().unwrap();
    let ch = ch.as_mut();
    assert_eq!(run_to_completion(ch, 1, write(0)), Ok(BdevOutput::Done));
    assert_eq!(run_to_completion(ch, 2, write(3584)), Ok(BdevOutput::Done));
    assert_eq!(run_to_completion(ch, 3, write(4096)), Err(BdevError::NoSpace));
    assert_eq!(run_to_completion(ch, 4, write(8192 - 512)), Err(BdevError::NoSpace));
    assert_eq!(run_to_completion(ch, 5, write(8192)), Ok(BdevOutput::Done));
    // Overlapping the range's start is enough.
    let big = BdevOp::Write { offset: 3584, data: vec![1; 1024].into(), fua: false };
    assert_eq!(run_to_completion(ch, 6, big), Err(BdevError::NoSpace));
    // Other kinds pass, and the failed writes never reached the disk.
    assert_eq!(run_to_completion(ch, 7, read(4096)), Ok(BdevOutput::Data(vec![0; BS])));
    assert_eq!(run_to_completion(ch, 8, BdevOp::Flush), Ok(BdevOutput::Done));
    assert_eq!(dev.control().stats().errors, 3);
    assert_eq!(dev.control().rule_stats(), vec![RuleStats { matched: 3, fired: 3 }]);
    assert_eq!(ch.outstanding(), 0);
}

#[test]
fn after_n_lets_the_first_ones_through() {
    let dev = device();
    dev.control().set(vec![FaultRule { after_n: 3, ..FaultRule::fail(OpKind::Writes, BdevError::Io("EIO".into())) }]).unwrap();
    let mut ch = dev.clone().channel().unwrap();
    let results: Vec<bool> = (0..6).map(|i| run_to_completion(ch.as_mut(), i, write(i * 512)).is_ok()).collect();
    assert_eq!(results, [true, true, true, false, false, false]);
    // Reads are not writes; write zeroes and deallocate are.
    assert!(run_to_completion(ch.as_mut(), 10, read(0)).is_ok());
    assert!(run_to_completion(ch.as_mut(), 11, BdevOp::WriteZeroes { offset: 0, len: 512 }).is_err());
    assert!(run_to_completion(ch.as_mut(), 12, BdevOp::Deallocate { offset: 0, len: 512 }).is_err());
}

#[test]
fn fraction_fails_roughly_that_share_reproducibly() {
    let dev = device();
    let rule = FaultRule { fraction: Some(0.3), seed: Some(42), ..FaultRule::fail(OpKind::Read, BdevError::Io("EIO".into())) };
    let mut ch = dev.clone().channel().unwrap();
    let mut pattern = |dev: &ErrorBdev| {
        dev.control().set(vec![rule.clone()]).unwrap();
        (0..1000).map(|i| run_to_completion(ch.as_mut(), i, read(0)).is_err()).collect::<Vec<bool>>()
    };
    let first = pattern(&dev);
    let failed = first.iter().filter(|&&f| f).count();
    assert!((240..=360).contains(&failed), "{failed} of 1000 failed");
    assert_eq!(pattern(&dev), first, "same seed, same faults");
    assert_eq!(dev.control().stats().errors, 2 * failed as u64);
}

#[test]
fn count_fails_that_many_then_passes() {
    let dev = device();
    dev.control().set(vec![FaultRule { count: Some(2), ..FaultRule::fail(OpKind::Any, BdevError::Fenced) }]).unwrap();
    let mut ch = dev.clone().channel().unwrap();
    assert_eq!(run_to_completion(ch.as_mut(), 1, BdevOp::Flush), Err(BdevError::Fenced));
    assert_eq!(run_to_completion(ch.as_mut(), 2, read(0)), Err(BdevError::Fenced));
    assert!(run_to_completion(ch.as_mut(), 3, read(0)).is_ok());
    assert!(run_to_completion(ch.as_mut(), 4, BdevOp::Flush).is_ok());
    assert_eq!(dev.control().rule_stats(), vec![RuleStats { matched: 4, fired: 2 }]);
}

#[test]
fn rules_are_tried_in_order() {
    let dev = device();
    dev.control()
        .set(vec![
            FaultRule { count: Some(1), ..FaultRule::fail(OpKind::Read, BdevError::Transition) },
            FaultRule::fail(OpKind::Read, BdevError::Fenced),
        ])
        .unwrap();
    let mut ch = dev.clone().channel().unwrap();
    assert_eq!(run_to_completion(ch.as_mut(), 1, read(0)), Err(BdevError::Transition));
    assert_eq!(run_to_completion(ch.as_mut(), 2, read(0)), Err(BdevError::Fenced));
    // Out of range is filled in with the command's range.
    dev.control().set(vec![FaultRule::fail(OpKind::Read, BdevError::OutOfRange { offset: 0, len: 0, size: 0 })]).unwrap();
    assert_eq!(run_to_completion(ch.as_mut(), 3, read(1024)), Err(BdevError::OutOfRange { offset: 1024, len: 512, size: 1 << 20 }));
}

#[test]
fn delay_holds_completions_until_the_deadline() {
    let dev = device();
    let delay = Duration::from_millis(60);
    dev.control()
        .set(vec![
            FaultRule { ops: OpKind::Write, delay: Some(delay), ..FaultRule::default() },
            FaultRule { delay: Some(delay), ..FaultRule::fail(OpKind::Flush, BdevError::NoSpace) },
        ])
        .unwrap();
    let mut ch = dev.clone().channel().unwrap();
    let start = Instant::now();
    ch.submit(1, write(0));
    ch.submit(2, BdevOp::Flush);
    ch.submit(3, read(512));
    let mut done = Vec::new();
    ch.poll(&mut done);
    // The undelayed read comes at once; the others wait, and count as outstanding.
    assert_eq!(done.iter().map(|c| c.tag).collect::<Vec<_>>(), [3]);
    assert_eq!(ch.outstanding(), 2);
    done.clear();
    while done.len() < 2 {
        assert!(start.elapsed() < Duration::from_secs(10), "the delayed completions never came");
        ch.poll(&mut done);
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(start.elapsed() >= delay);
    done.sort_by_key(|c| c.tag);
    assert_eq!(done[0], BdevCompletion { tag: 1, result: Ok(BdevOutput::Done) });
    assert_eq!(done[1], BdevCompletion { tag: 2, result: Err(BdevError::NoSpace) });
    assert_eq!(ch.outstanding(), 0);
    // The write was done on the disk.
    assert_eq!(run_to_completion(ch.as_mut(), 4, read(0)), Ok(BdevOutput::Data(vec![0xab; BS])));
    assert_eq!(dev.control().stats(), FaultStats { errors: 1, delayed: 2, dropped: 0 });
}

#[test]
fn the_wake_descriptor_rings_at_the_deadline() {
    let dev = device();
    dev.control()
        .set(vec![FaultRule { delay: Some(Duration::from_millis(20)), ..FaultRule::fail(OpKind::Read, BdevError::NoSpace) }])
        .unwrap();
    let mut ch = dev.clone().channel().unwrap();
    let fds = ch.wake_fds();
    assert_eq!(fds.len(), 1);
    ch.submit(1, read(0));
    let mut poll = mio::Poll::new().unwrap();
    poll.registry().register(&mut mio::unix::SourceFd(&fds[0]), mio::Token(0), mio::Interest::READABLE).unwrap();
    let mut events = mio::Events::with_capacity(4);
    let start = Instant::now();
    while events.is_empty() {
        poll.poll(&mut events, Some(Duration::from_secs(10))).unwrap();
        assert!(start.elapsed() < Duration::from_secs(10), "the alarm never rang");
    }
    let mut done = Vec::new();
    ch.poll(&mut done);
    assert_eq!(done.len(), 1);
    assert!(start.elapsed() >= Duration::from_millis(15));
    drop(ch);
}

#[test]
fn dropped_commands_never_complete_and_stay_outstanding() {
    let dev = device();
    dev.control().set(vec![FaultRule { ops: OpKind::Write, count: Some(1), drop: true, ..FaultRule::default() }]).unwrap();
    let mut ch = dev.clone().channel().unwrap();
    ch.submit(1, write(0));
    assert_eq!(run_to_completion(ch.as_mut(), 2, write(512)), Ok(BdevOutput::Done));
    assert!(wait_for(ch.as_mut(), 1, Duration::from_millis(20)).is_none());
    dev.control().clear();
    assert_eq!(ch.outstanding(), 1);
    assert_eq!(dev.control().stats().dropped, 1);
    // Never written.
    assert_eq!(run_to_completion(ch.as_mut(), 3, read(0)), Ok(BdevOutput::Data(vec![0; BS])));
}

#[test]
fn clear_restores_and_outstanding_returns_to_zero() {
    let dev = device();
    dev.control().add(FaultRule::fail(OpKind::Any, BdevError::Io("EIO".into()))).unwrap();
    let mut ch = dev.clone().channel().unwrap();
    ch.submit(1, write(0));
    assert_eq!(ch.outstanding(), 1);
    assert_eq!(wait_for(ch.as_mut(), 1, Duration::from_secs(1)).unwrap().result, Err(BdevError::Io("EIO".into())));
    assert_eq!(ch.outstanding(), 0);
    dev.control().clear();
    assert!(dev.control().rules().is_empty());
    assert_eq!(run_to_completion(ch.as_mut(), 2, write(0)), Ok(BdevOutput::Done));
    assert_eq!(ch.outstanding(), 0);
    // Another channel shares the control.
    let mut other = dev.clone().channel().unwrap();
    dev.control().add(FaultRule::fail(OpKind::Read, BdevError::NoSpace)).unwrap();
    assert_eq!(run_to_completion(other.as_mut(), 3, read(0)), Err(BdevError::NoSpace));
    assert_eq!(run_to_completion(ch.as_mut(), 4, read(0)), Err(BdevError::NoSpace));
}

#[test]
fn rules_parse_from_json() {
    let r = parse_rule(r#"{"op":"write","error":"nospace","offset":0,"len":1048576,"after":3}"#).unwrap();
    assert_eq!(r, FaultRule { offset: Some(0), len: Some(1 << 20), after_n: 3, ..FaultRule::fail(OpKind::Write, BdevError::NoSpace) });
    let r = parse_rule(r#"{"error":"eio","fraction":0.5,"count":10,"seed":7}"#).unwrap();
    assert_eq!(
        (r.ops, r.error, r.fraction, r.count, r.seed),
        (OpKind::Any, Some(BdevError::Io("EIO".into())), Some(0.5), Some(10), Some(7))
    );
    let r = parse_rule(r#"{"op":"flush","delay_ms":2.5}"#).unwrap();
    assert_eq!(r.delay, Some(Duration::from_micros(2500)));
    assert_eq!(parse_rule(r#"{"op":"read","error":{"io":"medium error"}}"#).unwrap().error, Some(BdevError::Io("medium error".into())));
    assert_eq!(parse_rule(r#"{"op":"write_zeroes","error":"enospc"}"#).unwrap().ops, OpKind::WriteZeroes);
    assert!(parse_rule(r#"{"op":"read","drop":true}"#).unwrap().drop);

    for bad in [
        r#"{"op":"write"}"#,
        r#"{"op":"wrte","error":"eio"}"#,
        r#"{"error":"eio","fraction":1.5}"#,
        r#"{"error":"eio","len":0}"#,
        r#"{"error":"eio","colour":"red"}"#,
        r#"{"op":"flush","error":"eio","offset":0}"#,
        r#"{"drop":true,"error":"eio"}"#,
        r#"{"error":"eio","delay_ms":-1}"#,
        r#"{"error":"bogus"}"#,
        "not json",
    ] {
        assert!(parse_rule(bad).is_err(), "{bad} parsed");
    }

    let rules = parse_rules(r#"[{"op":"read","error":"fenced"},{"op":"write","error":"transition","after":1}]"#).unwrap();
    assert_eq!(rules.len(), 2);
    assert_eq!(parse_rules(r#"{"error":"eio"}"#).unwrap().len(), 1);
    assert!(parse_rules(r#"[{"error":"eio"},{"op":"read"}]"#).is_err());

    // What the rules say about themselves reads back the same.
    for r in rules.iter().chain(&[
        parse_rule(r#"{"op":"write","error":"nospace","offset":0,"len":1048576,"after":3,"delay_ms":5}"#).unwrap(),
        parse_rule(r#"{"error":{"io":"x"},"fraction":0.25,"seed":1,"count":2}"#).unwrap(),
    ]) {
        assert_eq!(&parse_rule(&serde_json::to_string(r).unwrap()).unwrap(), r);
    }
    assert!(ErrorControl::new().set(vec![FaultRule::default()]).is_err());
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(32))]
    /// Whatever the mix of faults, every command not dropped completes exactly once and
    /// `outstanding` counts exactly those that have not.
    #[test]
    fn every_command_completes_once_and_outstanding_tells_the_truth(
        ops in proptest::collection::vec((0u8..4, 0u64..16), 1..40),
        delay_us in 0u64..500,
        fail_fraction in 0.0f64..1.0,
        drops in 0u64..3,
    ) {
        let dev = device();
        dev.control().set(vec![
            FaultRule { ops: OpKind::Write, drop: true, count: Some(drops), ..FaultRule::default() },
            FaultRule { fraction: Some(fail_fraction), ..FaultRule::fail(OpKind::Read, BdevError::Io("EIO".into())) },
            FaultRule { delay: Some(Duration::from_micros(delay_us)), fraction: Some(0.5), ..FaultRule::default() },
        ]).unwrap();
        let mut ch = dev.clone().channel().unwrap();
        for (tag, &(kind, block)) in ops.iter().enumerate() {
            let op = match kind {
                0 => read(block * 512),
                1 => write(block * 512),
                2 => BdevOp::Flush,
                _ => BdevOp::WriteZeroes { offset: block * 512, len: 512 },
            };
            ch.submit(tag as u64, op);
        }
        let mut done = Vec::new();
        let start = Instant::now();
        let dropped = || dev.control().stats().dropped as usize;
        while done.len() + dropped() < ops.len() {
            proptest::prop_assert!(start.elapsed() < Duration::from_secs(10), "commands never completed");
            ch.poll(&mut done);
            proptest::prop_assert_eq!(ch.outstanding(), ops.len() - done.len());
        }
        let mut tags: Vec<u64> = done.iter().map(|c| c.tag).collect();
        tags.sort_unstable();
        tags.dedup();
        proptest::prop_assert_eq!(tags.len(), done.len());
        proptest::prop_assert_eq!(ch.outstanding(), dropped());
    }
}
