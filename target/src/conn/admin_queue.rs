//! The admin queue's work: admin commands (the controller's state published to its I/O queues),
//! the flushes of a controller shutdown (CC.SHN), and the periodic tick: keep-alive, asynchronous
//! events, and an I/O queue noticing that its controller went away.

use super::{Conn, Ctx, Inflight, IoKind, ListenerKind, Role};
use nvmetro_bdev::IoBuf;
use nvmetro_bdev::{BdevOp, IoBufMut};
use nvmetro_proto::controller::AdminOutcome;
use nvmetro_proto::nvme::{admin, fctype, Command, Status};
use std::sync::atomic::Ordering;
use std::sync::Arc;

impl Conn {
    pub(super) fn on_admin(&mut self, cmd: Command, data: IoBufMut, ctx: &mut Ctx) {
        let Role::Admin(q) = &mut self.role else { return };
        let outcome = match q.subsystem.clone() {
            Some((subsystem, handle)) => {
                let ListenerKind::Subsystems(listener) = self.listener else { return };
                let view = q.view_of(&subsystem, listener, ctx.target);
                let out = q.ctrl.handle_admin(&view, &subsystem.health(), &cmd, &data, ctx.now_ms);
                handle.ready.store(q.ctrl.is_ready(), Ordering::Release);
                handle.generation.store(q.ctrl.reset_generation(), Ordering::Release);
                handle.io_queues_granted.store(u64::from(q.ctrl.io_queues()), Ordering::Release);
                handle.write_cache.store(q.ctrl.write_cache(), Ordering::Release);
                out
            }
            None => {
                let view = q.discovery_view.as_ref().expect("discovery controllers keep a view");
                q.ctrl.handle_admin(view, &Default::default(), &cmd, &data, ctx.now_ms)
            }
        };
        let dropped = q.ctrl.take_dropped_commands();
        let shutdown = q.ctrl.take_shutdown_request();
        if let Some(w) = self.wire.tcp() {
            w.forget_commands(dropped);
        }
        match outcome {
            AdminOutcome::Complete(cqe, out) => {
                let len = out.len().min(cmd.sgl_len() as usize);
                self.respond(cqe, &out[..len]);
                if cmd.opcode() == admin::FABRICS && cmd.fctype() == fctype::DISCONNECT {
                    self.close_with("host disconnected the admin queue".into(), false);
                }
            }
            AdminOutcome::Held => {}
        }
        if shutdown {
            self.start_shutdown(ctx);
        }
    }

    /// CC.SHN: flushes every namespace's bdev; CSTS.SHST reads "processing" until all are done.
    fn start_shutdown(&mut self, ctx: &mut Ctx) {
        let Role::Admin(q) = &mut self.role else { return };
        let namespaces = match &q.subsystem {
            Some((subsystem, _)) => subsystem.namespaces(),
            None => Arc::new(Vec::new()),
        };
        if namespaces.is_empty() {
            return q.ctrl.shutdown_complete();
        }
        tracing::info!(peer = %self.peer, cntlid = q.ctrl.cntlid, "shutdown: flushing {} namespaces", namespaces.len());
        let slot = self.alloc(Inflight {
            cid: 0,
            kind: IoKind::Shutdown,
            remaining: namespaces.len() as u32,
            status: Status::SUCCESS,
            bytes: 0,
            data: Vec::new(),
            buffer: IoBuf::empty(),
            ns: None,
            start: ctx.now,
            flush_after: None,
        });
        for ns in namespaces.iter() {
            ns.stats.flushes.fetch_add(1, Ordering::Relaxed);
            self.submit(ns.bdev, slot, BdevOp::Flush, ctx);
        }
    }

    /// Periodic work: keep-alive, asynchronous events, and noticing a dead controller.
    pub fn on_tick(&mut self, ctx: &mut Ctx) {
        let mut aens = Vec::new();
        match &mut self.role {
            Role::Admin(q) => {
                if q.ctrl.keep_alive_expired(ctx.now_ms) {
                    tracing::warn!(peer = %self.peer, host = %q.ctrl.hostnqn, cntlid = q.ctrl.cntlid, "keep-alive timeout ({} ms); dropping controller", q.ctrl.kato_ms());
                    self.close_with("keep-alive timeout".into(), true);
                    return;
                }
                match (q.subsystem.clone(), &mut q.discovery_view) {
                    (Some((subsystem, _)), _) => {
                        if let ListenerKind::Subsystems(listener) = self.listener {
                            let view = q.view_of(&subsystem, listener, ctx.target);
                            aens = q.ctrl.poll_events(&view);
                        }
                    }
                    (None, Some(view)) => {
                        if ctx.target.discovery.genctr() != view.discovery_genctr {
                            *view = ctx.target.discovery.view_for(&q.ctrl.hostnqn, &ctx.target.subsystems());
                        }
                        aens = q.ctrl.poll_events(view);
                    }
                    (None, None) => {}
                }
            }
            Role::Io(q) => {
                if !q.handle.alive.load(Ordering::Acquire) || q.handle.generation.load(Ordering::Acquire) != q.generation {
                    let why = format!("controller {} went away", q.handle.cntlid);
                    self.close_with(why, true);
                }
            }
            Role::Unconnected => {}
        }
        for cqe in aens {
            self.respond(cqe, &[]);
        }
    }
}
