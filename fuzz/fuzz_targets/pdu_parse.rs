//! Any bytes, any digest setting, any data limit: `parse` returns a PDU, asks for more, or names an
//! error, and a PDU it returns re-encodes to bytes it parses identically.
#![no_main]
use libfuzzer_sys::fuzz_target;
use nvmetro_proto::pdu::{self, Digests, Pdu};

fuzz_target!(|input: &[u8]| {
    let Some((&flags, bytes)) = input.split_first() else { return };
    let digests = Digests::from_bits(flags & 3);
    let max_data = [0usize, 512, 8192, 131072][(flags >> 2) as usize & 3];
    let mut rest = bytes;
    while let Ok(Some((p, n))) = pdu::parse(rest, digests, max_data) {
        assert!(n <= rest.len() && n >= 8);
        if let Pdu::CapsuleCmd { cmd, data } = p {
            let mut again = Vec::new();
            pdu::encode_capsule_cmd(&mut again, &cmd, data, digests, 0);
            let (q, m) = pdu::parse(&again, digests, max_data.max(data.len())).expect("re-encoded PDU parses").expect("complete");
            assert_eq!(m, again.len());
            assert_eq!(q, Pdu::CapsuleCmd { cmd, data });
        }
        rest = &rest[n..];
    }
});
