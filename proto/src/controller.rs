//! The controller state machine: Connect parsing, properties, admin commands, asynchronous
//! events, keep-alive, and validation of I/O commands into [`IoRequest`]s. Time comes in as
//! milliseconds from the caller; nothing here blocks or does I/O.

use crate::identify::{self, AEN_ANA_CHANGE, AEN_DISCOVERY_CHANGE, AEN_NS_ATTR, MAX_AERS};
use crate::nvme::{admin, fctype, get_str, io, le16, le32, le64, Command, Completion, Fuse, Status};
use crate::subsystem::{Health, SubsystemKind, SubsystemView};
use std::collections::VecDeque;

/// A parsed Connect command and its 1 KiB data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectRequest {
    pub qid: u16,
    /// Queue size, one-based (the wire field is zero-based).
    pub queue_size: u32,
    pub kato_ms: u32,
    pub hostid: [u8; 16],
    pub cntlid: u16,
    pub subnqn: String,
    pub hostnqn: String,
    /// CATTR bit 2: the host will not track SQ head pointers.
    pub sq_flow_disabled: bool,
}

/// Offsets inside the Connect data, reported as IPO in an invalid-parameter response.
pub mod connect_offset {
    pub const CNTLID: u16 = 16;
    pub const SUBNQN: u16 = 256;
    pub const HOSTNQN: u16 = 512;
}

/// A Connect failure naming the bad field: in the data (`in_data`) or the command at `offset`.
pub fn connect_error(cid: u16, status: Status, in_data: bool, offset: u16) -> Completion {
    Completion::new(cid, status).with_result(u64::from(in_data) << 16 | u64::from(offset))
}

/// Parses a Connect command; errors are the completion to send.
pub fn parse_connect(cmd: &Command, data: &[u8]) -> Result<ConnectRequest, Completion> {
    let cid = cmd.cid();
    if cmd.opcode() != admin::FABRICS || cmd.fctype() != fctype::CONNECT {
        return Err(Completion::new(cid, Status::COMMAND_SEQUENCE_ERROR));
    }
    let recfmt = le16(&cmd.0, 40);
    if recfmt != 0 {
        return Err(connect_error(cid, Status::CONNECT_INCOMPATIBLE_FORMAT, false, 40));
    }
    if data.len() < 1024 {
        return Err(Completion::new(cid, Status::SGL_DATA_LENGTH_INVALID));
    }
    let sqsize = le16(&cmd.0, 44);
    let qid = le16(&cmd.0, 42);
    if sqsize == 0 || sqsize >= identify::MAX_QUEUE_ENTRIES || (qid == 0 && sqsize < 31) {
        return Err(connect_error(cid, Status::CONNECT_INVALID_PARAMETERS, false, 44));
    }
    let mut hostid = [0u8; 16];
    hostid.copy_from_slice(&data[0..16]);
    Ok(ConnectRequest {
        qid,
        queue_size: u32::from(sqsize) + 1,
        kato_ms: le32(&cmd.0, 48),
        hostid,
        cntlid: le16(data, 16),
        subnqn: get_str(&data[256..512]),
        hostnqn: get_str(&data[512..768]),
        sq_flow_disabled: cmd.0[46] & 0x04 != 0,
    })
}

/// Property offsets.
pub mod prop {
    pub const CAP: u32 = 0x00;
    pub const VS: u32 = 0x08;
    pub const CC: u32 = 0x14;
    pub const CSTS: u32 = 0x1c;
}

const CC_EN: u32 = 1;
const CSTS_RDY: u32 = 1;
const CSTS_SHST_MASK: u32 = 3 << 2;
const CSTS_SHST_PROCESSING: u32 = 1 << 2;
const CSTS_SHST_COMPLETE: u32 = 2 << 2;

/// The most data one Get Log Page returns: every log this controller has is smaller, and no
/// transfer may exceed MDTS anyway.
pub const MAX_LOG_TRANSFER: usize = identify::MAX_TRANSFER;

/// What an admin command resulted in.
#[derive(Debug, PartialEq, Eq)]
pub enum AdminOutcome {
    /// Send this completion, with this data for the host (empty if none).
    Complete(Completion, Vec<u8>),
    /// Held: an Async Event Request, completed later by [`Controller::poll_events`].
    Held,
}

/// One controller: created by an admin-queue Connect, shared in spirit by its I/O queues.
#[derive(Debug)]
pub struct Controller {
    pub cntlid: u16,
    pub hostnqn: String,
    pub hostid: [u8; 16],
    cc: u32,
    csts: u32,
    kato_ms: u32,
    last_heard_ms: u64,
    aec: u32,
    io_queues: u16,
    write_cache: bool,
    /// In-capsule data its I/O queues accept (Identify IOCCSZ reports it).
    io_in_capsule: usize,
    /// The host's queues are NVMe/RDMA: Identify Controller advertises keyed SGL data blocks.
    keyed_sgls: bool,
    held_aers: VecDeque<u16>,
    queued_events: VecDeque<u32>,
    seen_ana: u64,
    seen_ns: u64,
    seen_discovery: u64,
    ana_armed: bool,
    ns_armed: bool,
    discovery_armed: bool,
    reset_generation: u64,
    /// CC.SHN was written: the caller must flush every namespace, then call
    /// [`Controller::shutdown_complete`].
    shutdown_requested: bool,
    /// Held Async Event Requests a reset dropped (the transport stops counting them).
    dropped_commands: usize,
}

/// Most I/O queues a controller grants.
pub const MAX_IO_QUEUES: u16 = 64;

impl Controller {
    /// Sets the in-capsule data size of this controller's I/O queues (a multiple of 16), which
    /// Identify Controller reports in IOCCSZ.
    pub fn set_io_in_capsule(&mut self, bytes: usize) {
        self.io_in_capsule = bytes;
    }

    /// Marks the controller as reached over NVMe/RDMA: Identify Controller's SGLS then reports
    /// keyed SGL data blocks (bit 2), which Linux's nvme-rdma host requires.
    pub fn set_keyed_sgls(&mut self, on: bool) {
        self.keyed_sgls = on;
    }

    pub fn new(cntlid: u16, req: &ConnectRequest, view: &SubsystemView, now_ms: u64) -> Controller {
        Controller {
            cntlid,
            hostnqn: req.hostnqn.clone(),
            hostid: req.hostid,
            cc: 0,
            csts: 0,
            kato_ms: req.kato_ms,
            last_heard_ms: now_ms,
            aec: 0,
            io_queues: MAX_IO_QUEUES,
            write_cache: true,
            io_in_capsule: identify::IO_IN_CAPSULE,
            keyed_sgls: false,
            held_aers: VecDeque::new(),
            queued_events: VecDeque::new(),
            seen_ana: view.ana_change_count,
            seen_ns: view.ns_change_count,
            seen_discovery: view.discovery_genctr,
            ana_armed: true,
            ns_armed: true,
            discovery_armed: true,
            reset_generation: 0,
            shutdown_requested: false,
            dropped_commands: 0,
        }
    }

    /// CC.EN = 1 and CSTS.RDY = 1: I/O queues may connect.
    pub fn is_ready(&self) -> bool {
        self.csts & CSTS_RDY != 0
    }

    /// CSTS.SHST reads "shutdown processing complete".
    pub fn is_shut_down(&self) -> bool {
        self.csts & CSTS_SHST_MASK == CSTS_SHST_COMPLETE
    }

    /// Whether the host asked for a shutdown since the last call: the caller flushes every
    /// namespace and then calls [`Controller::shutdown_complete`]; until then CSTS.SHST reads
    /// "shutdown processing occurring".
    pub fn take_shutdown_request(&mut self) -> bool {
        std::mem::take(&mut self.shutdown_requested)
    }

    /// Every namespace is flushed: CSTS.SHST reads "shutdown processing complete" (unless a
    /// reset came in between).
    pub fn shutdown_complete(&mut self) {
        if self.csts & CSTS_SHST_MASK == CSTS_SHST_PROCESSING {
            self.csts = (self.csts & !CSTS_SHST_MASK) | CSTS_SHST_COMPLETE;
        }
    }

    /// Whether the host enabled the volatile write cache (Set Features 06h; on by default).
    /// While it is off every write must be durable before it completes.
    pub fn write_cache(&self) -> bool {
        self.write_cache
    }

    /// Commands that ended without a completion since the last call (Async Event Requests held
    /// when the controller was reset).
    pub fn take_dropped_commands(&mut self) -> usize {
        std::mem::take(&mut self.dropped_commands)
    }

    /// Bumped by every disable: I/O queues of an older generation must be dropped.
    pub fn reset_generation(&self) -> u64 {
        self.reset_generation
    }

    /// Number of I/O queues granted (Set Features 07h).
    pub fn io_queues(&self) -> u16 {
        self.io_queues
    }

    pub fn kato_ms(&self) -> u32 {
        self.kato_ms
    }

    /// Whether the host has been silent for longer than its keep-alive timeout (plus the 100 ms
    /// granularity we advertise in KAS).
    pub fn keep_alive_expired(&self, now_ms: u64) -> bool {
        self.kato_ms != 0 && now_ms.saturating_sub(self.last_heard_ms) > u64::from(self.kato_ms) + 100
    }

    /// Records traffic from the host that counts as keep-alive.
    pub fn heard_from_host(&mut self, now_ms: u64) {
        self.last_heard_ms = now_ms;
    }

    /// Handles one admin-queue command (other than Connect).
    pub fn handle_admin(&mut self, view: &SubsystemView, health: &Health, cmd: &Command, data: &[u8], now_ms: u64) -> AdminOutcome {
        self.last_heard_ms = now_ms;
        let cid = cmd.cid();
        let done = |status: Status| AdminOutcome::Complete(Completion::new(cid, status), Vec::new());
        let with = |result: u64| AdminOutcome::Complete(Completion::new(cid, Status::SUCCESS).with_result(result), Vec::new());
        let data_out = |d: Vec<u8>| AdminOutcome::Complete(Completion::new(cid, Status::SUCCESS), d);
        if cmd.opcode() == admin::FABRICS {
            return match cmd.fctype() {
                fctype::PROPERTY_GET => match self.property_get(le32(&cmd.0, 44), cmd.0[40] & 7) {
                    Some(v) => with(v),
                    None => done(Status::INVALID_FIELD),
                },
                fctype::PROPERTY_SET => self.property_set(cid, le32(&cmd.0, 44), le64(&cmd.0, 48)),
                fctype::CONNECT => done(Status::COMMAND_SEQUENCE_ERROR),
                fctype::DISCONNECT => done(Status::SUCCESS),
                _ => done(Status::INVALID_OPCODE),
            };
        }
        if !self.is_ready() {
            return done(Status::COMMAND_SEQUENCE_ERROR);
        }
        let nvm = view.kind == SubsystemKind::Nvm;
        match cmd.opcode() {
            admin::IDENTIFY => {
                let cns = cmd.cdw(10) & 0xff;
                let nsid = cmd.nsid();
                match (cns, nvm) {
                    (0x01, _) => data_out(identify::controller(view, self.cntlid, self.io_in_capsule, self.keyed_sgls)),
                    (0x00, true) => match view.namespace(nsid) {
                        Some(ns) => data_out(identify::namespace(ns)),
                        None if nsid != 0 && nsid <= view.max_namespaces => data_out(vec![0; identify::PAGE]),
                        None => done(Status::INVALID_NAMESPACE),
                    },
                    (0x02, true) if nsid < 0xffff_fffe => data_out(identify::active_namespaces(view, nsid)),
                    (0x03, true) => match view.namespace(nsid) {
                        Some(ns) => data_out(identify::namespace_descriptors(ns)),
                        None => done(Status::INVALID_NAMESPACE),
                    },
                    _ => done(Status::INVALID_FIELD),
                }
            }
            admin::GET_LOG_PAGE => self.get_log_page(view, health, cmd),
            admin::SET_FEATURES => self.set_features(view, cmd, data),
            admin::GET_FEATURES => self.get_features(view, cmd),
            admin::ASYNC_EVENT_REQUEST => {
                if self.held_aers.len() >= MAX_AERS {
                    return done(Status::ASYNC_EVENT_LIMIT);
                }
                self.held_aers.push_back(cid);
                AdminOutcome::Held
            }
            admin::KEEP_ALIVE => done(Status::SUCCESS),
            // Best effort, as the spec allows: report "not aborted" (dword 0 bit 0).
            admin::ABORT => with(1),
            _ => done(Status::INVALID_OPCODE),
        }
    }

    fn property_get(&self, offset: u32, size: u8) -> Option<u64> {
        let cap: u64 = u64::from(identify::MAX_QUEUE_ENTRIES - 1) // MQES
            | 1 << 16 // CQR: contiguous queues required
            | 20 << 24 // TO: 10 s to become ready
            | 1 << 37; // CSS: NVM command set
        match (offset, size) {
            (prop::CAP, 1) => Some(cap),
            (prop::VS, 0) => Some(u64::from(identify::VERSION_1_4)),
            (prop::CC, 0) => Some(u64::from(self.cc)),
            (prop::CSTS, 0) => Some(u64::from(self.csts)),
            _ => None,
        }
    }

    fn property_set(&mut self, cid: u16, offset: u32, value: u64) -> AdminOutcome {
        if offset != prop::CC {
            return AdminOutcome::Complete(Completion::new(cid, Status::INVALID_FIELD), Vec::new());
        }
        let new = value as u32;
        let was_enabled = self.cc & CC_EN != 0;
        let enable = new & CC_EN != 0;
        if enable && !was_enabled {
            let (iosqes, iocqes) = ((new >> 16) & 0xf, (new >> 20) & 0xf);
            let css = (new >> 4) & 7;
            if (iosqes != 0 && iosqes != 6) || (iocqes != 0 && iocqes != 4) || css != 0 {
                return AdminOutcome::Complete(Completion::new(cid, Status::INVALID_FIELD), Vec::new());
            }
            self.csts = CSTS_RDY;
        } else if !enable && was_enabled {
            self.reset();
        }
        if (new >> 14) & 3 != 0 && self.csts & CSTS_SHST_MASK == 0 {
            // Shutdown: complete once the caller flushed every namespace's volatile cache.
            self.csts |= CSTS_SHST_PROCESSING;
            self.shutdown_requested = true;
        }
        self.cc = new;
        AdminOutcome::Complete(Completion::new(cid, Status::SUCCESS), Vec::new())
    }

    fn reset(&mut self) {
        self.csts = 0;
        self.shutdown_requested = false;
        self.dropped_commands += self.held_aers.len();
        self.held_aers.clear();
        self.queued_events.clear();
        self.reset_generation += 1;
    }

    fn get_log_page(&mut self, view: &SubsystemView, health: &Health, cmd: &Command) -> AdminOutcome {
        let cid = cmd.cid();
        let (dw10, dw11) = (cmd.cdw(10), cmd.cdw(11));
        let lid = dw10 & 0xff;
        let lsp = (dw10 >> 8) & 0x7f;
        let retain = dw10 & (1 << 15) != 0;
        let numd = u64::from((dw11 & 0xffff) << 16 | dw10 >> 16) + 1;
        let offset = u64::from(cmd.cdw(12)) | u64::from(cmd.cdw(13)) << 32;
        // What the host asked for, before anything is allocated: at most what it has room for
        // and what one transfer may carry (NUMD alone could ask for 16 GiB).
        let asked = (numd * 4).min(u64::from(cmd.sgl_len())).min(MAX_LOG_TRANSFER as u64) as usize;
        if offset % 4 != 0 {
            return AdminOutcome::Complete(Completion::new(cid, Status::INVALID_FIELD), Vec::new());
        }
        let nvm = view.kind == SubsystemKind::Nvm;
        let page = match (lid, nvm) {
            (0x01, _) => vec![0u8; 64],
            (0x02, true) => identify::smart_log(health),
            (0x03, true) => identify::firmware_log(view),
            (0x04, true) => {
                if !retain {
                    self.ns_armed = true;
                }
                identify::changed_namespaces(&view.changed_namespaces)
            }
            (0x05, true) => identify::command_effects(),
            (0x0c, true) => {
                if !retain {
                    self.ana_armed = true;
                }
                identify::ana_log(view, lsp & 1 != 0)
            }
            (0x70, false) => {
                if !retain {
                    self.discovery_armed = true;
                }
                identify::discovery_log(view)
            }
            _ => return AdminOutcome::Complete(Completion::new(cid, Status::INVALID_LOG_PAGE), Vec::new()),
        };
        // Only what the log has from `offset` on is returned.
        let start = match usize::try_from(offset) {
            Ok(start) if start <= page.len() => start,
            _ => return AdminOutcome::Complete(Completion::new(cid, Status::INVALID_FIELD), Vec::new()),
        };
        let n = (page.len() - start).min(asked);
        AdminOutcome::Complete(Completion::new(cid, Status::SUCCESS), page[start..start + n].to_vec())
    }

    fn set_features(&mut self, view: &SubsystemView, cmd: &Command, _data: &[u8]) -> AdminOutcome {
        let cid = cmd.cid();
        let fid = cmd.cdw(10) & 0xff;
        let save = cmd.cdw(10) & (1 << 31) != 0;
        let dw11 = cmd.cdw(11);
        let ok = |r: u64| AdminOutcome::Complete(Completion::new(cid, Status::SUCCESS).with_result(r), Vec::new());
        let err = |s| AdminOutcome::Complete(Completion::new(cid, s), Vec::new());
        if save {
            return err(Status::FEATURE_NOT_SAVEABLE);
        }
        match fid {
            0x06 if view.namespaces.iter().any(|n| n.volatile_cache) => {
                self.write_cache = dw11 & 1 != 0;
                ok(0)
            }
            0x07 => {
                let (nsq, ncq) = ((dw11 & 0xffff) as u16, (dw11 >> 16) as u16);
                if nsq == 0xffff || ncq == 0xffff {
                    return err(Status::INVALID_FIELD);
                }
                self.io_queues = (nsq.max(ncq) + 1).min(MAX_IO_QUEUES);
                let granted = u64::from(self.io_queues - 1);
                ok(granted | granted << 16)
            }
            0x0b => {
                self.aec = dw11;
                ok(0)
            }
            0x0f => {
                self.kato_ms = dw11;
                ok(0)
            }
            // The host identifier comes with Connect on fabrics.
            0x81 => err(Status::COMMAND_SEQUENCE_ERROR),
            _ => err(Status::INVALID_FIELD),
        }
    }

    fn get_features(&mut self, view: &SubsystemView, cmd: &Command) -> AdminOutcome {
        let cid = cmd.cid();
        let fid = cmd.cdw(10) & 0xff;
        let sel = (cmd.cdw(10) >> 8) & 7;
        let ok = |r: u64| AdminOutcome::Complete(Completion::new(cid, Status::SUCCESS).with_result(r), Vec::new());
        let vwc = view.namespaces.iter().any(|n| n.volatile_cache);
        if sel == 3 {
            // Supported capabilities: changeable, not saveable.
            return match fid {
                0x06 if vwc => ok(0b100),
                0x07 | 0x0b | 0x0f => ok(0b100),
                _ => AdminOutcome::Complete(Completion::new(cid, Status::INVALID_FIELD), Vec::new()),
            };
        }
        let default = sel == 1;
        match fid {
            0x06 if vwc => ok(u64::from(default || self.write_cache)),
            0x07 => {
                let granted = u64::from(if default { MAX_IO_QUEUES } else { self.io_queues } - 1);
                ok(granted | granted << 16)
            }
            0x0b => ok(if default { 0 } else { u64::from(self.aec) }),
            0x0f => ok(if default { 0 } else { u64::from(self.kato_ms) }),
            0x81 => AdminOutcome::Complete(Completion::new(cid, Status::SUCCESS).with_result(1), self.hostid.to_vec()),
            _ => AdminOutcome::Complete(Completion::new(cid, Status::INVALID_FIELD), Vec::new()),
        }
    }

    /// Turns changes in `view` into asynchronous events and completes held Async Event Requests
    /// with them. Returns completions to send.
    pub fn poll_events(&mut self, view: &SubsystemView) -> Vec<Completion> {
        // Event dword 0: type (bits 2:0), information (15:8), log page (23:16).
        const NOTICE: u32 = 2;
        if view.ana_change_count != self.seen_ana {
            self.seen_ana = view.ana_change_count;
            if self.aec & AEN_ANA_CHANGE != 0 && self.ana_armed {
                self.ana_armed = false;
                self.queued_events.push_back(NOTICE | 0x03 << 8 | 0x0c << 16);
            }
        }
        if view.ns_change_count != self.seen_ns {
            self.seen_ns = view.ns_change_count;
            if self.aec & AEN_NS_ATTR != 0 && self.ns_armed {
                self.ns_armed = false;
                self.queued_events.push_back(NOTICE | 0x04 << 16);
            }
        }
        if view.discovery_genctr != self.seen_discovery {
            self.seen_discovery = view.discovery_genctr;
            if self.aec & AEN_DISCOVERY_CHANGE != 0 && self.discovery_armed {
                self.discovery_armed = false;
                self.queued_events.push_back(NOTICE | 0xf0 << 8 | 0x70 << 16);
            }
        }
        let mut out = Vec::new();
        while !self.held_aers.is_empty() && !self.queued_events.is_empty() {
            let cid = self.held_aers.pop_front().expect("non-empty");
            let ev = self.queued_events.pop_front().expect("non-empty");
            out.push(Completion::new(cid, Status::SUCCESS).with_result(u64::from(ev)));
        }
        out
    }
}

/// An I/O command, validated against its namespace and path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IoRequest {
    Read {
        nsid: u32,
        slba: u64,
        blocks: u32,
    },
    Write {
        nsid: u32,
        slba: u64,
        blocks: u32,
        fua: bool,
    },
    Compare {
        nsid: u32,
        slba: u64,
        blocks: u32,
    },
    WriteZeroes {
        nsid: u32,
        slba: u64,
        blocks: u32,
        deallocate: bool,
    },
    /// Dataset Management with the deallocate attribute: (slba, blocks) ranges.
    Deallocate {
        nsid: u32,
        ranges: Vec<(u64, u32)>,
    },
    /// Dataset Management without deallocate: an accepted hint with nothing to do.
    Hint,
    /// Flush of one namespace or, for NSID FFFFFFFFh, all of them.
    Flush {
        nsid: u32,
    },
}

impl IoRequest {
    pub fn writes(&self) -> bool {
        matches!(self, IoRequest::Write { .. } | IoRequest::WriteZeroes { .. } | IoRequest::Deallocate { .. })
    }

    /// The request as the controller's volatile write cache setting makes it: with the cache
    /// disabled (Set Features 06h, WCE = 0) every write is Force Unit Access.
    pub fn under_write_cache(self, enabled: bool) -> IoRequest {
        match self {
            IoRequest::Write { nsid, slba, blocks, fua } => IoRequest::Write { nsid, slba, blocks, fua: fua || !enabled },
            other => other,
        }
    }
}

/// Validates an I/O command. `data` is its host-to-controller data; `read_len` the host's buffer.
pub fn decode_io(view: &SubsystemView, cmd: &Command, data: &[u8]) -> Result<IoRequest, Status> {
    let nsid = cmd.nsid();
    if cmd.opcode() == io::FLUSH && nsid == 0xffff_ffff {
        if let Some(blocked) = view.namespaces.iter().find_map(|ns| view.ana_state(ns.ana_group).io_status()) {
            return Err(blocked);
        }
        return Ok(IoRequest::Flush { nsid });
    }
    let ns = view.namespace(nsid).ok_or(Status::INVALID_NAMESPACE)?;
    if let Some(status) = view.ana_state(ns.ana_group).io_status() {
        return Err(status);
    }
    let range = |cmd: &Command| -> Result<(u64, u32), Status> {
        let (slba, blocks) = (cmd.slba(), cmd.nlb());
        match slba.checked_add(u64::from(blocks)) {
            Some(end) if end <= ns.blocks => Ok((slba, blocks)),
            _ => Err(Status::LBA_OUT_OF_RANGE),
        }
    };
    let bytes = |blocks: u32| u64::from(blocks) * u64::from(ns.block_size);
    match cmd.opcode() {
        io::READ => {
            let (slba, blocks) = range(cmd)?;
            if u64::from(cmd.sgl_len()) < bytes(blocks) {
                return Err(Status::SGL_DATA_LENGTH_INVALID);
            }
            if bytes(blocks) > identify::MAX_TRANSFER as u64 {
                return Err(Status::INVALID_FIELD);
            }
            Ok(IoRequest::Read { nsid, slba, blocks })
        }
        io::WRITE | io::COMPARE => {
            let (slba, blocks) = range(cmd)?;
            if data.len() as u64 != bytes(blocks) {
                return Err(Status::SGL_DATA_LENGTH_INVALID);
            }
            if cmd.opcode() == io::WRITE {
                Ok(IoRequest::Write { nsid, slba, blocks, fua: cmd.cdw(12) & (1 << 30) != 0 })
            } else {
                Ok(IoRequest::Compare { nsid, slba, blocks })
            }
        }
        io::WRITE_ZEROES => {
            let (slba, blocks) = range(cmd)?;
            Ok(IoRequest::WriteZeroes { nsid, slba, blocks, deallocate: cmd.cdw(12) & (1 << 25) != 0 })
        }
        io::DATASET_MANAGEMENT => {
            let nr = (cmd.cdw(10) & 0xff) as usize + 1;
            if data.len() < nr * 16 {
                return Err(Status::SGL_DATA_LENGTH_INVALID);
            }
            if cmd.cdw(11) & (1 << 2) == 0 {
                return Ok(IoRequest::Hint);
            }
            let mut ranges = Vec::with_capacity(nr);
            for r in data[..nr * 16].chunks_exact(16) {
                let (blocks, slba) = (le32(r, 4), le64(r, 8));
                match slba.checked_add(u64::from(blocks)) {
                    Some(end) if end <= ns.blocks => ranges.push((slba, blocks)),
                    _ => return Err(Status::LBA_OUT_OF_RANGE),
                }
            }
            Ok(IoRequest::Deallocate { nsid, ranges })
        }
        io::FLUSH => Ok(IoRequest::Flush { nsid }),
        _ => Err(Status::INVALID_OPCODE),
    }
}

/// Pairs fused Compare and Write commands, which must arrive back to back on one queue.
#[derive(Debug)]
pub struct FusePairer<D = Vec<u8>> {
    first: Option<(Command, D)>,
}

impl<D> Default for FusePairer<D> {
    fn default() -> Self {
        FusePairer { first: None }
    }
}

/// What the pairer made of a command.
#[derive(Debug, PartialEq, Eq)]
pub enum Fused<D = Vec<u8>> {
    /// An ordinary command.
    Single(Command, D),
    /// The first half arrived; wait for the second.
    Waiting,
    /// A complete pair: compare (with its data), then write (with its data).
    Pair { compare: (Command, D), write: (Command, D) },
    /// Broken sequence: complete these with errors, then handle `next` (if any) normally.
    Broken { failed: Vec<Completion>, next: Option<(Command, D)> },
}

impl<D> FusePairer<D> {
    pub fn push(&mut self, cmd: Command, data: D) -> Fused<D> {
        match (cmd.fuse(), self.first.take()) {
            (Fuse::Normal, None) => Fused::Single(cmd, data),
            (Fuse::First, None) => {
                if cmd.opcode() != io::COMPARE {
                    return Fused::Broken { failed: vec![Completion::new(cmd.cid(), Status::INVALID_FIELD)], next: None };
                }
                self.first = Some((cmd, data));
                Fused::Waiting
            }
            (Fuse::Second, Some(first)) => {
                let same_range = first.0.nsid() == cmd.nsid() && first.0.slba() == cmd.slba() && first.0.nlb() == cmd.nlb();
                if cmd.opcode() != io::WRITE || !same_range {
                    return Fused::Broken {
                        failed: vec![
                            Completion::new(first.0.cid(), Status::FUSED_FAILED),
                            Completion::new(cmd.cid(), Status::INVALID_FIELD),
                        ],
                        next: None,
                    };
                }
                Fused::Pair { compare: first, write: (cmd, data) }
            }
            (Fuse::Second, None) | (Fuse::Reserved, None) => {
                Fused::Broken { failed: vec![Completion::new(cmd.cid(), Status::FUSED_MISSING)], next: None }
            }
            (_, Some(first)) => {
                // The second half never came: the first is aborted, this one goes on by itself.
                let failed = vec![Completion::new(first.0.cid(), Status::FUSED_MISSING)];
                let mut again = FusePairer::default();
                match again.push(cmd, data) {
                    Fused::Single(c, d) => Fused::Broken { failed, next: Some((c, d)) },
                    Fused::Waiting => {
                        *self = again;
                        Fused::Broken { failed, next: None }
                    }
                    Fused::Broken { failed: more, next } => Fused::Broken { failed: [failed, more].concat(), next },
                    Fused::Pair { .. } => unreachable!("a fresh pairer cannot complete a pair"),
                }
            }
        }
    }
}
