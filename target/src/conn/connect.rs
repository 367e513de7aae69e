//! A queue's first command, Fabrics Connect: a discovery controller, a new controller on the
//! admin queue (qid 0), or an I/O queue of an existing controller; refusals say why, with the
//! status and the offending field's offset.

#[cfg(feature = "rdma")]
use super::Wire;
use super::{AdminQueue, Conn, Ctx, IoQueue, ListenerKind, Role};
use crate::subsys::ConnectRefusal;
use nvmetro_bdev::IoBufMut;
use nvmetro_proto::controller::{self, connect_offset, Controller, FusePairer};
use nvmetro_proto::nvme::{Command, Completion, Status};
use nvmetro_proto::subsystem::DISCOVERY_NQN;
use std::sync::atomic::Ordering;

impl Conn {
    pub(super) fn on_connect(&mut self, cmd: Command, data: IoBufMut, ctx: &mut Ctx) {
        let cid = cmd.cid();
        let req = match controller::parse_connect(&cmd, &data) {
            Ok(r) => r,
            Err(cqe) => {
                tracing::warn!(peer = %self.peer, "bad Connect: {}", cqe.status());
                return self.respond(cqe, &[]);
            }
        };
        let refuse = |this: &mut Conn, status, in_data, offset, why: String| {
            tracing::warn!(peer = %this.peer, host = %req.hostnqn, subsystem = %req.subnqn, "Connect refused: {why}");
            this.respond(controller::connect_error(cid, status, in_data, offset), &[]);
        };
        if req.subnqn == DISCOVERY_NQN {
            if req.qid != 0 {
                return refuse(self, Status::CONNECT_INVALID_PARAMETERS, false, 42, "discovery has no I/O queues".into());
            }
            let view = ctx.target.discovery.view_for(&req.hostnqn, &ctx.target.subsystems());
            let cntlid = ctx.target.next_discovery_cntlid();
            let mut ctrl = Controller::new(cntlid, &req, &view, ctx.now_ms);
            ctrl.set_keyed_sgls(self.is_rdma());
            tracing::info!(peer = %self.peer, host = %req.hostnqn, cntlid, "discovery controller connected");
            self.role = Role::Admin(Box::new(AdminQueue {
                ctrl,
                remote_host: false,
                config_generation: 0,
                subsystem: None,
                discovery_view: Some(view),
            }));
            self.queue_size = req.queue_size;
            self.wire_connected(req.queue_size, None);
            return self.respond(Completion::new(cid, Status::SUCCESS).with_result(u64::from(cntlid)), &[]);
        }
        let ListenerKind::Subsystems(listener) = self.listener else {
            return refuse(self, Status::CONNECT_INVALID_PARAMETERS, true, connect_offset::SUBNQN, "discovery-only listener".into());
        };
        let Some(subsystem) = ctx.target.subsystem(&req.subnqn) else {
            return refuse(self, Status::CONNECT_INVALID_PARAMETERS, true, connect_offset::SUBNQN, "no such subsystem".into());
        };
        let refusal_status = |r: &ConnectRefusal| match r {
            ConnectRefusal::HostNotAllowed(_) => (Status::CONNECT_INVALID_HOST, true, connect_offset::HOSTNQN),
            ConnectRefusal::NoControllerId => (Status::CONNECT_CONTROLLER_BUSY, false, 0),
            ConnectRefusal::UnknownController { .. } => (Status::CONNECT_INVALID_PARAMETERS, true, connect_offset::CNTLID),
            ConnectRefusal::NotReady(_) => (Status::COMMAND_SEQUENCE_ERROR, false, 0),
        };
        #[cfg(feature = "rdma")]
        if let Wire::Rdma(w) = &self.wire {
            if w.cm_qid != req.qid {
                let why = format!("Connect names queue {} but the RDMA connection was made for queue {}", req.qid, w.cm_qid);
                return refuse(self, Status::CONNECT_INVALID_PARAMETERS, false, 42, why);
            }
        }
        self.queue_size = req.queue_size;
        self.qid = req.qid;
        self.sq_flow_disabled = req.sq_flow_disabled;
        if req.qid == 0 {
            let handle = match subsystem.add_controller(&req.hostnqn) {
                Ok(h) => h,
                Err(r) => {
                    let (s, d, o) = refusal_status(&r);
                    return refuse(self, s, d, o, r.to_string());
                }
            };
            let view = subsystem.view(listener);
            let mut ctrl = Controller::new(handle.cntlid, &req, &view, ctx.now_ms);
            ctrl.set_io_in_capsule(self.limits.io_in_capsule);
            ctrl.set_keyed_sgls(self.is_rdma());
            tracing::info!(peer = %self.peer, host = %req.hostnqn, subsystem = %req.subnqn, cntlid = handle.cntlid, kato_ms = req.kato_ms, "controller created");
            let cntlid = handle.cntlid;
            let remote_host = ctx.target.config().host_is_remote(&req.hostnqn);
            let config_generation = ctx.target.config_generation();
            self.role = Role::Admin(Box::new(AdminQueue {
                ctrl,
                remote_host,
                config_generation,
                subsystem: Some((subsystem, handle)),
                discovery_view: None,
            }));
            self.wire_connected(req.queue_size, None);
            self.respond(Completion::new(cid, Status::SUCCESS).with_result(u64::from(cntlid)), &[]);
        } else {
            let handle = match subsystem.find_controller(req.cntlid, &req.hostnqn) {
                Ok(h) => h,
                Err(r) => {
                    let (s, d, o) = refusal_status(&r);
                    return refuse(self, s, d, o, r.to_string());
                }
            };
            if u64::from(req.qid) > handle.io_queues_granted.load(Ordering::Acquire) {
                return refuse(self, Status::CONNECT_INVALID_PARAMETERS, false, 42, format!("queue {} beyond those granted", req.qid));
            }
            tracing::debug!(peer = %self.peer, cntlid = handle.cntlid, qid = req.qid, "I/O queue connected");
            let generation = handle.generation.load(Ordering::Acquire);
            let cntlid = handle.cntlid;
            let cache = subsystem.io_cache(listener);
            self.role = Role::Io(IoQueue { subsystem, cache, handle, generation, pairer: FusePairer::default() });
            self.wire_connected(req.queue_size, Some(self.limits.io_in_capsule));
            self.respond(Completion::new(cid, Status::SUCCESS).with_result(u64::from(cntlid)), &[]);
        }
    }
}
