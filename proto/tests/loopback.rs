//! A host and a controller driven against each other in memory: transports, Connect, properties,
//! Identify, log pages, asynchronous events and I/O validation, with no sockets and no clocks.

use nvmetro_proto::cmds;
use nvmetro_proto::controller::{self, decode_io, prop, AdminOutcome, Controller, FusePairer, Fused, IoRequest};
use nvmetro_proto::nvme::{le_u16, le_u32, sgl, Command, Completion, Status};
use nvmetro_proto::pdu::Digests;
use nvmetro_proto::subsystem::{AnaState, Health, NamespaceInfo, SubsystemKind, SubsystemView};
use nvmetro_proto::tcp::{HostEvent, HostTransport, TargetEvent, TargetLimits, TargetTransport};

fn view() -> SubsystemView {
    SubsystemView {
        kind: SubsystemKind::Nvm,
        nqn: "nqn.2026-11.io.nvmetro:test".into(),
        serial: "SN1".into(),
        model: "nvmetro".into(),
        firmware: "0.1".into(),
        namespaces: vec![NamespaceInfo {
            nsid: 1,
            block_size: 512,
            blocks: 2048,
            nguid: [7; 16],
            eui64: [8; 8],
            uuid: [0; 16],
            ana_group: 1,
            volatile_cache: false,
        }],
        ana_groups: vec![AnaState::Optimized],
        ana_change_count: 1,
        ns_change_count: 0,
        changed_namespaces: vec![],
        discovery_log: vec![],
        discovery_genctr: 0,
        max_namespaces: 32,
        ana_transition_time: 10,
        sole_groups: Vec::new(),
    }
}

/// A target with one admin queue: transport + controller, answering in memory.
struct Rig {
    host: HostTransport,
    target: TargetTransport,
    ctrl: Option<Controller>,
    view: SubsystemView,
    now: u64,
    next_cid: u16,
}

impl Rig {
    fn new(digests: Digests) -> Rig {
        let mut tx = Vec::new();
        let host = HostTransport::new(digests, 8192, &mut tx);
        let mut rig = Rig { host, target: TargetTransport::new(TargetLimits::default()), ctrl: None, view: view(), now: 0, next_cid: 1 };
        let events = rig.pump(tx);
        assert_eq!(events, vec![HostEvent::Connected]);
        rig
    }

    /// Moves bytes host -> target -> host until both are quiet; returns the host's events.
    fn pump(&mut self, mut h2t: Vec<u8>) -> Vec<HostEvent> {
        let mut host_events = Vec::new();
        for _ in 0..8 {
            let mut t2h = Vec::new();
            let mut events = Vec::new();
            let used = self.target.receive(&h2t, &mut t2h, &mut events).expect("target accepts host PDUs");
            h2t.drain(..used);
            for ev in events {
                let (cqe, data) = match ev {
                    TargetEvent::Reject(c) => (c, Vec::new()),
                    TargetEvent::Command { cmd, data } => match self.execute(&cmd, &data) {
                        Some(r) => r,
                        None => continue,
                    },
                };
                self.target.respond(&cqe, &data, &mut t2h);
            }
            if let Some(ctrl) = self.ctrl.as_mut() {
                for cqe in ctrl.poll_events(&self.view) {
                    self.target.respond(&cqe, &[], &mut t2h);
                }
            }
            if t2h.is_empty() && h2t.is_empty() {
                break;
            }
            let used = self.host.receive(&t2h, &mut h2t, &mut host_events).expect("host accepts target PDUs");
            assert_eq!(used, t2h.len());
        }
        host_events
    }

    fn execute(&mut self, cmd: &Command, data: &[u8]) -> Option<(Completion, Vec<u8>)> {
        let Some(ctrl) = self.ctrl.as_mut() else {
            let req = match controller::parse_connect(cmd, data) {
                Ok(r) => r,
                Err(c) => return Some((c, Vec::new())),
            };
            self.ctrl = Some(Controller::new(5, &req, &self.view, self.now));
            self.target.set_connected(req.queue_size);
            return Some((Completion::new(cmd.cid(), Status::SUCCESS).with_result(5), Vec::new()));
        };
        match ctrl.handle_admin(&self.view, &Health::default(), cmd, data, self.now) {
            AdminOutcome::Complete(c, d) => Some((c, d)),
            AdminOutcome::Held => None,
        }
    }

    fn cmd(&mut self, mut c: Command, write: Vec<u8>, read_len: usize) -> (Completion, Vec<u8>) {
        let cid = self.next_cid;
        self.next_cid += 1;
        c.0[2..4].copy_from_slice(&cid.to_le_bytes());
        let mut tx = Vec::new();
        self.host.submit(c, write, read_len, &mut tx);
        let events = self.pump(tx);
        for ev in events {
            if let HostEvent::Completed { cqe, data } = ev {
                if cqe.cid == cid {
                    return (cqe, data);
                }
            }
        }
        panic!("no completion for cid {cid}");
    }

    fn connect_and_enable(&mut self) {
        let (c, d) = cmds::connect(0, 0, 32, 5000, 0xffff, "nqn.2026-11.io.nvmetro:test", "nqn.host", [1; 16]);
        let (cqe, _) = self.cmd(c, d, 0);
        assert_eq!((cqe.status(), cqe.result), (Status::SUCCESS, 5));
        let (cqe, _) = self.cmd(cmds::property_get(0, prop::CAP), vec![], 0);
        assert_eq!(cqe.result & 0xffff, 1023, "MQES");
        assert_eq!(self.cmd(cmds::property_set(0, prop::CC, cmds::CC_ENABLE), vec![], 0).0.status(), Status::SUCCESS);
        let (cqe, _) = self.cmd(cmds::property_get(0, prop::CSTS), vec![], 0);
        assert_eq!(cqe.result & 1, 1, "CSTS.RDY");
    }
}

#[test]
fn connect_enable_identify_with_digests() {
    for d in [Digests::default(), Digests { header: true, data: true }] {
        let mut rig = Rig::new(d);
        rig.connect_and_enable();
        let (cqe, id) = rig.cmd(cmds::identify(0, 1, 0), vec![], 4096);
        assert!(cqe.status().is_success());
        assert_eq!(id.len(), 4096);
        assert_eq!(id[76], 0x0a, "CMIC: multi-controller and ANA");
        assert_eq!(le_u32(&id, 540), 32, "MNAN");
        assert_eq!(le_u32(&id, 1792), (64 + 8192) / 16, "IOCCSZ");
        assert_eq!(le_u16(&id, 78), 5, "CNTLID");
        assert_eq!(&id[768..768 + 27], b"nqn.2026-11.io.nvmetro:test");
        let (_, ns) = rig.cmd(cmds::identify(0, 0, 1), vec![], 4096);
        assert_eq!(ns[30], 1, "NMIC shared");
        assert_eq!(&ns[104..120], &[7; 16], "NGUID");
        let (_, descs) = rig.cmd(cmds::identify(0, 3, 1), vec![], 4096);
        assert_eq!((descs[0], descs[1]), (1, 8), "EUI-64 descriptor first");
        let (cqe, _) = rig.cmd(cmds::identify(0, 0, 99), vec![], 4096);
        assert_eq!(cqe.status(), Status::INVALID_NAMESPACE);
    }
}

#[test]
fn admin_commands_need_an_enabled_controller() {
    let mut rig = Rig::new(Digests::default());
    let (c, d) = cmds::connect(0, 0, 32, 0, 0xffff, "nqn.2026-11.io.nvmetro:test", "nqn.host", [1; 16]);
    rig.cmd(c, d, 0);
    let (cqe, _) = rig.cmd(cmds::identify(0, 1, 0), vec![], 4096);
    assert_eq!(cqe.status(), Status::COMMAND_SEQUENCE_ERROR);
}

#[test]
fn ana_log_and_change_event() {
    let mut rig = Rig::new(Digests::default());
    rig.connect_and_enable();
    rig.cmd(cmds::set_features(0, 0x0b, 1 << 11), vec![], 0);
    let (_, log) = rig.cmd(cmds::get_log_page(0, 0x0c, 0, 16 + 32 + 4, 0), vec![], 52);
    assert_eq!(le_u16(&log, 8), 1, "one group");
    assert_eq!((le_u32(&log, 16), le_u32(&log, 20), log[32], le_u32(&log, 48)), (1, 1, 1, 1));

    // An AER is held until something happens.
    let mut tx = Vec::new();
    rig.host.submit(cmds::async_event_request(900), vec![], 0, &mut tx);
    assert!(rig.pump(tx).is_empty());
    rig.view.ana_groups[0] = AnaState::Inaccessible;
    rig.view.ana_change_count += 1;
    let events = rig.pump(Vec::new());
    let [HostEvent::Completed { cqe, .. }] = events.as_slice() else { panic!("AER not completed: {events:?}") };
    assert_eq!((cqe.cid, cqe.result), (900, 0x0c0302));

    let (_, log) = rig.cmd(cmds::get_log_page(0, 0x0c, 0, 52, 0), vec![], 52);
    assert_eq!(log[32], AnaState::Inaccessible as u8);
}

#[test]
fn keep_alive_is_enforced() {
    let mut rig = Rig::new(Digests::default());
    rig.connect_and_enable();
    rig.now = 4000;
    rig.cmd(cmds::keep_alive(0), vec![], 0);
    assert!(!rig.ctrl.as_ref().unwrap().keep_alive_expired(9000));
    assert!(rig.ctrl.as_ref().unwrap().keep_alive_expired(9200));
}

#[test]
fn connect_rejects_bad_queue_size_and_format() {
    let (mut c, d) = cmds::connect(1, 0, 32, 0, 0xffff, "s", "h", [0; 16]);
    c.0[44] = 0;
    assert_eq!(controller::parse_connect(&c, &d).unwrap_err().status(), Status::CONNECT_INVALID_PARAMETERS);
    let (mut c, d) = cmds::connect(1, 0, 32, 0, 0xffff, "s", "h", [0; 16]);
    c.0[40] = 1;
    assert_eq!(controller::parse_connect(&c, &d).unwrap_err().status(), Status::CONNECT_INCOMPATIBLE_FORMAT);
    assert!(controller::parse_connect(&c, &d[..10]).is_err());
}

#[test]
fn io_validation() {
    let v = view();
    let w = cmds::write(1, 1, 2040, 8);
    assert_eq!(decode_io(&v, &w, &[0; 4096]), Ok(IoRequest::Write { nsid: 1, slba: 2040, blocks: 8, fua: false }));
    assert_eq!(decode_io(&v, &cmds::write(1, 1, 2041, 8), &[0; 4096]), Err(Status::LBA_OUT_OF_RANGE));
    assert_eq!(decode_io(&v, &cmds::write(1, 1, u64::MAX, 8), &[0; 4096]), Err(Status::LBA_OUT_OF_RANGE));
    assert_eq!(decode_io(&v, &w, &[0; 512]), Err(Status::SGL_DATA_LENGTH_INVALID));
    assert_eq!(decode_io(&v, &cmds::write(1, 2, 0, 1), &[0; 512]), Err(Status::INVALID_NAMESPACE));
    assert_eq!(decode_io(&v, &Command::new(0x99, 1), &[]).unwrap_err(), Status::INVALID_NAMESPACE);
    let mut bad_op = Command::new(0x99, 1);
    bad_op.set_nsid(1);
    assert_eq!(decode_io(&v, &bad_op, &[]), Err(Status::INVALID_OPCODE));
    let mut inaccessible = v.clone();
    inaccessible.ana_groups[0] = AnaState::Inaccessible;
    assert_eq!(decode_io(&inaccessible, &w, &[0; 4096]), Err(Status::ANA_INACCESSIBLE));
    let (dsm, data) = cmds::deallocate(1, 1, &[(0, 8), (100, 4)]);
    assert_eq!(decode_io(&v, &dsm, &data), Ok(IoRequest::Deallocate { nsid: 1, ranges: vec![(0, 8), (100, 4)] }));
}

#[test]
fn fused_pairs_and_broken_sequences() {
    let mut p = FusePairer::default();
    let (cmp, wr) = cmds::compare_and_write(1, 2, 1, 10, 1);
    assert_eq!(p.push(cmp, vec![1]), Fused::Waiting);
    assert!(matches!(p.push(wr, vec![2]), Fused::Pair { .. }));
    // First half followed by an ordinary command: the first is aborted, the other goes on.
    assert_eq!(p.push(cmp, vec![]), Fused::Waiting);
    let plain = cmds::read(3, 1, 0, 1);
    assert_eq!(
        p.push(plain, vec![]),
        Fused::Broken { failed: vec![Completion::new(1, Status::FUSED_MISSING)], next: Some((plain, vec![])) }
    );
    // A second half alone.
    assert_eq!(p.push(wr, vec![]), Fused::Broken { failed: vec![Completion::new(2, Status::FUSED_MISSING)], next: None });
}

fn admin_data(outcome: AdminOutcome) -> (Status, Vec<u8>) {
    match outcome {
        AdminOutcome::Complete(c, d) => (c.status(), d),
        AdminOutcome::Held => panic!("held"),
    }
}

#[test]
fn get_log_page_returns_only_what_the_log_has() {
    let mut rig = Rig::new(Digests::default());
    rig.connect_and_enable();
    let ctrl = rig.ctrl.as_mut().unwrap();
    // NUMD at its maximum (16 GiB) with a host buffer just as large.
    let max_numd = |lid: u8, offset: u64| {
        let mut c = cmds::get_log_page(7, lid, 0, 4, offset);
        c.set_cdw(10, c.cdw(10) | 0xffff << 16);
        c.set_cdw(11, 0xffff);
        c.set_sgl(0, u32::MAX, sgl::TRANSPORT);
        c
    };
    let (status, smart) = admin_data(ctrl.handle_admin(&rig.view, &Health::default(), &max_numd(0x02, 0), &[], 0));
    assert_eq!((status, smart.len()), (Status::SUCCESS, 512), "the SMART log is 512 bytes");
    assert!(smart.capacity() <= 4096, "nothing near NUMD x 4 was allocated: {}", smart.capacity());
    let (status, tail) = admin_data(ctrl.handle_admin(&rig.view, &Health::default(), &max_numd(0x02, 500), &[], 0));
    assert_eq!((status, tail), (Status::SUCCESS, smart[500..].to_vec()));
    let (status, _) = admin_data(ctrl.handle_admin(&rig.view, &Health::default(), &max_numd(0x02, 516), &[], 0));
    assert_eq!(status, Status::INVALID_FIELD, "offset beyond the log");
    // The host's buffer bounds it too; and through the transport it arrives whole.
    let mut small = max_numd(0x05, 0);
    small.set_sgl(0, 100, sgl::TRANSPORT);
    let (_, effects) = admin_data(ctrl.handle_admin(&rig.view, &Health::default(), &small, &[], 0));
    assert_eq!(effects.len(), 100);
    let (cqe, ana) = rig.cmd(max_numd(0x0c, 0), vec![], 128 * 1024);
    assert_eq!((cqe.status(), ana.len()), (Status::SUCCESS, 16 + 32 + 4), "one group, one namespace");
}

#[test]
fn volatile_write_cache_off_makes_every_write_fua() {
    let mut rig = Rig::new(Digests::default());
    rig.view.namespaces[0].volatile_cache = true;
    rig.connect_and_enable();
    let (_, id) = rig.cmd(cmds::identify(0, 1, 0), vec![], 4096);
    assert_eq!(id[525] & 1, 1, "VWC present");
    let get = |rig: &mut Rig| rig.cmd(cmds::get_features(0, 0x06), vec![], 0).0.result;
    assert_eq!(get(&mut rig), 1, "enabled by default");
    let w = cmds::write(1, 1, 0, 1);
    let decoded = |rig: &Rig| decode_io(&rig.view, &w, &[0; 512]).unwrap().under_write_cache(rig.ctrl.as_ref().unwrap().write_cache());
    assert_eq!(decoded(&rig), IoRequest::Write { nsid: 1, slba: 0, blocks: 1, fua: false });

    assert_eq!(rig.cmd(cmds::set_features(0, 0x06, 0), vec![], 0).0.status(), Status::SUCCESS);
    assert_eq!(get(&mut rig), 0, "Get Features returns what was set");
    assert_eq!(decoded(&rig), IoRequest::Write { nsid: 1, slba: 0, blocks: 1, fua: true });
    let (_, id) = rig.cmd(cmds::identify(0, 1, 0), vec![], 4096);
    assert_eq!(id[525] & 1, 1, "the cache is still present, only disabled");
    // Reads and other commands are untouched.
    let mut read = cmds::read(1, 1, 0, 1);
    read.set_sgl(0, 512, sgl::TRANSPORT);
    let r = decode_io(&rig.view, &read, &[]).unwrap();
    assert_eq!(r.clone().under_write_cache(false), r);

    assert_eq!(rig.cmd(cmds::set_features(0, 0x06, 1), vec![], 0).0.status(), Status::SUCCESS);
    assert_eq!(get(&mut rig), 1);
    assert_eq!(decoded(&rig), IoRequest::Write { nsid: 1, slba: 0, blocks: 1, fua: false });
}

#[test]
fn volatile_write_cache_feature_needs_a_cache() {
    let mut rig = Rig::new(Digests::default());
    rig.connect_and_enable();
    let (_, id) = rig.cmd(cmds::identify(0, 1, 0), vec![], 4096);
    assert_eq!(id[525] & 1, 0, "no VWC");
    assert_eq!(rig.cmd(cmds::set_features(0, 0x06, 0), vec![], 0).0.status(), Status::INVALID_FIELD);
    assert_eq!(rig.cmd(cmds::get_features(0, 0x06), vec![], 0).0.status(), Status::INVALID_FIELD);
    let mut caps = cmds::get_features(0, 0x06);
    caps.set_cdw(10, caps.cdw(10) | 3 << 8);
    assert_eq!(rig.cmd(caps, vec![], 0).0.status(), Status::INVALID_FIELD, "no capabilities for a missing feature");
}

#[test]
fn shutdown_completes_only_after_the_flush() {
    let mut rig = Rig::new(Digests::default());
    rig.connect_and_enable();
    let csts = |rig: &mut Rig| rig.cmd(cmds::property_get(0, prop::CSTS), vec![], 0).0.result;
    assert_eq!(rig.cmd(cmds::property_set(0, prop::CC, cmds::CC_SHUTDOWN), vec![], 0).0.status(), Status::SUCCESS);
    assert_eq!((csts(&mut rig) >> 2) & 3, 1, "shutdown processing occurring");
    let ctrl = rig.ctrl.as_mut().unwrap();
    assert!(!ctrl.is_shut_down());
    assert!(ctrl.take_shutdown_request(), "the caller is asked to flush");
    assert!(!ctrl.take_shutdown_request(), "once");
    // Writing CC.SHN again while it is processing asks for nothing new.
    assert_eq!(rig.cmd(cmds::property_set(0, prop::CC, cmds::CC_SHUTDOWN), vec![], 0).0.status(), Status::SUCCESS);
    assert!(!rig.ctrl.as_mut().unwrap().take_shutdown_request());
    assert_eq!((csts(&mut rig) >> 2) & 3, 1);
    rig.ctrl.as_mut().unwrap().shutdown_complete();
    assert_eq!((csts(&mut rig) >> 2) & 3, 2, "shutdown processing complete");
    assert!(rig.ctrl.as_ref().unwrap().is_shut_down());
}

#[test]
fn a_reset_drops_held_event_requests() {
    let mut rig = Rig::new(Digests::default());
    rig.connect_and_enable();
    let mut tx = Vec::new();
    rig.host.submit(cmds::async_event_request(900), vec![], 0, &mut tx);
    rig.host.submit(cmds::async_event_request(901), vec![], 0, &mut tx);
    assert!(rig.pump(tx).is_empty());
    assert_eq!(rig.target.outstanding(), 2);
    assert_eq!(rig.cmd(cmds::property_set(0, prop::CC, 0), vec![], 0).0.status(), Status::SUCCESS);
    let dropped = rig.ctrl.as_mut().unwrap().take_dropped_commands();
    assert_eq!(dropped, 2);
    rig.target.forget_commands(dropped);
    assert_eq!(rig.target.outstanding(), 0);
}
