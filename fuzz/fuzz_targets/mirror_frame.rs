//! Any bytes on the replication link: `Frame::parse` returns a frame, asks for more or names an
//! error; a frame it returns re-encodes to the same bytes. The frames then arrive on the lanes
//! of a three-lane link (the lane taken from each frame's sequence number): the receiver takes
//! them or names an error, and never hands on more frames than it took.
#![no_main]
use libfuzzer_sys::fuzz_target;
use nvmetro_bdev::mirror::frame::Frame;
use nvmetro_bdev::mirror::lanes::LaneReceiver;

fuzz_target!(|input: &[u8]| {
    let mut rest = input;
    let mut lanes = LaneReceiver::new(3);
    lanes.start_checking();
    let (mut taken, mut handed_on) = (0usize, 0usize);
    while let Ok(Some((f, n))) = Frame::parse(rest) {
        assert!(n <= rest.len());
        let mut again = Vec::new();
        f.encode(&mut again);
        assert_eq!(&again[..], &rest[..n], "a parsed frame re-encodes to its bytes");
        rest = &rest[n..];
        let lane = (f.seq % 4) as usize;
        if lanes.push(lane, f).is_ok() {
            taken += 1;
        }
        while lanes.pop().is_some() {
            handed_on += 1;
        }
    }
    assert_eq!(taken, handed_on + lanes.holding());
});
