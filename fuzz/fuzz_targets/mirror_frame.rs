//! Any bytes on the replication link: `Frame::parse` returns a frame, asks for more or names an
//! error; a frame it returns re-encodes to the same bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use nvmetro_bdev::mirror::frame::Frame;

fuzz_target!(|input: &[u8]| {
    let mut rest = input;
    while let Ok(Some((f, n))) = Frame::parse(rest) {
        assert!(n <= rest.len());
        let mut again = Vec::new();
        f.encode(&mut again);
        assert_eq!(&again[..], &rest[..n], "a parsed frame re-encodes to its bytes");
        rest = &rest[n..];
    }
});
