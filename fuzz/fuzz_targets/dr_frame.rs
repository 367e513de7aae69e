//! Any bytes on a DR stream: `DrFrame::parse` returns a frame, asks for more or names an error;
//! a frame it returns re-encodes to bytes that parse to the same frame.
#![no_main]
use libfuzzer_sys::fuzz_target;
use nvmetro_bdev::dr::frame::DrFrame;

fuzz_target!(|input: &[u8]| {
    let mut rest = input;
    while let Ok(Some((f, n))) = DrFrame::parse(rest) {
        assert!(n <= rest.len());
        let mut again = Vec::new();
        f.encode(&mut again);
        assert_eq!(DrFrame::parse(&again), Ok(Some((f, again.len()))), "a parsed frame re-encodes to itself");
        rest = &rest[n..];
    }
});
