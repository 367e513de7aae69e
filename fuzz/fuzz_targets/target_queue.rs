//! A hostile host: arbitrary bytes, split at arbitrary points, fed to the target's transport and
//! every resulting command to a controller and the I/O validator. Nothing may panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use nvmetro_proto::controller::{decode_io, parse_connect, Controller};
use nvmetro_proto::nvme::{Completion, Status};
use nvmetro_proto::pdu::{self, Digests};
use nvmetro_proto::subsystem::{AnaState, Health, NamespaceInfo, SubsystemKind, SubsystemView};
use nvmetro_proto::tcp::{TargetEvent, TargetLimits, TargetTransport};

fuzz_target!(|input: &[u8]| {
    let view = SubsystemView {
        kind: SubsystemKind::Nvm,
        nqn: "nqn.2026-11.io.nvmetro:fuzz".into(),
        serial: "F".into(),
        model: "F".into(),
        firmware: "F".into(),
        namespaces: vec![NamespaceInfo {
            nsid: 1, block_size: 512, blocks: 1024, nguid: [1; 16], eui64: [1; 8], uuid: [0; 16], ana_group: 1, volatile_cache: true,
        }],
        ana_groups: vec![AnaState::Optimized],
        ana_change_count: 1,
        ns_change_count: 0,
        changed_namespaces: vec![],
        discovery_log: vec![],
        discovery_genctr: 0,
        max_namespaces: 8,
        ana_transition_time: 10,
        sole_groups: Vec::new(),
    };
    let Some((&split, bytes)) = input.split_first() else { return };
    let mut stream = Vec::new();
    pdu::encode_icreq(&mut stream, 0, Digests::from_bits(split & 3), 0);
    stream.extend_from_slice(bytes);
    let mut t = TargetTransport::new(TargetLimits { in_capsule: 4096, maxh2cdata: 4096, max_transfer: 16384 });
    let mut ctrl: Option<Controller> = None;
    let (mut tx, mut events) = (Vec::new(), Vec::new());
    let chunk = usize::from(split >> 2).max(1);
    let mut buf = Vec::new();
    for piece in stream.chunks(chunk) {
        buf.extend_from_slice(piece);
        tx.clear();
        match t.receive(&buf, &mut tx, &mut events) {
            Ok(used) => {
                buf.drain(..used);
            }
            Err(_) => return,
        }
        for ev in events.drain(..) {
            let (cmd, data) = match ev {
                TargetEvent::Command { cmd, data } => (cmd, data),
                TargetEvent::Reject(cqe) => {
                    t.respond(&cqe, &[], &mut tx);
                    continue;
                }
            };
            match ctrl.as_mut() {
                None => match parse_connect(&cmd, &data) {
                    Ok(req) => {
                        ctrl = Some(Controller::new(1, &req, &view, 0));
                        t.set_connected(req.queue_size);
                        t.respond(&Completion::new(cmd.cid(), Status::SUCCESS), &[], &mut tx);
                    }
                    Err(cqe) => t.respond(&cqe, &[], &mut tx),
                },
                Some(c) => {
                    // Answer every command, as the target does, so the queue bound is exercised
                    // and not just hit.
                    if let nvmetro_proto::controller::AdminOutcome::Complete(cqe, out) =
                        c.handle_admin(&view, &Health::default(), &cmd, &data, 1)
                    {
                        t.respond(&cqe, &out, &mut tx);
                    }
                    t.forget_commands(c.take_dropped_commands());
                    if c.take_shutdown_request() {
                        c.shutdown_complete();
                    }
                    let _ = c.poll_events(&view);
                    let _ = decode_io(&view, &cmd, &data);
                }
            }
        }
    }
});
