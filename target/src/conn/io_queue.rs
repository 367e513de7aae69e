//! I/O commands as bdev operations: decoding against the namespace table, in-flight slots and
//! their bdev tags, fused Compare and Write, flushes when the host's write cache is off, and
//! completions: bdev errors as NVMe statuses, statistics, the response.

use super::{Conn, Ctx, Inflight, IoKind, ListenerKind, Role, Wire};
use nvmetro_bdev::{BdevError, BdevOp, BdevOutput, IoBuf, IoBufMut};
use nvmetro_proto::controller::{decode_io, IoRequest};
use nvmetro_proto::nvme::{Command, Completion, Status};
use std::io;
use std::sync::atomic::Ordering;

impl Conn {
    pub(super) fn alloc(&mut self, f: Inflight) -> u32 {
        if let Some(st) = &f.ns {
            st.inflight.fetch_add(1, Ordering::Relaxed);
        }
        let slot = self.free_slots.pop().unwrap_or_else(|| {
            self.inflight.push(None);
            (self.inflight.len() - 1) as u32
        });
        self.inflight[slot as usize] = Some(f);
        slot
    }

    pub(super) fn submit(&mut self, bdev: usize, slot: u32, op: BdevOp, ctx: &mut Ctx) {
        let tag = u64::from(self.token) << 32 | u64::from(slot);
        match ctx.channels.get(bdev, ctx.target, ctx.registry) {
            Ok(ch) => ch.submit(tag, op),
            Err(e) => self.channel_failed(bdev, slot, e, ctx),
        }
    }

    /// [`Conn::submit`] of a Read, offering `buf` for its data.
    fn submit_read(&mut self, bdev: usize, slot: u32, offset: u64, len: usize, buf: Vec<u8>, ctx: &mut Ctx) {
        let tag = u64::from(self.token) << 32 | u64::from(slot);
        match ctx.channels.get(bdev, ctx.target, ctx.registry) {
            Ok(ch) => ch.submit_read(tag, offset, len, buf),
            Err(e) => self.channel_failed(bdev, slot, e, ctx),
        }
    }

    /// [`Conn::submit`] of a Read into `buf`, a buffer the wire sends from uncopied.
    fn submit_read_buf(&mut self, bdev: usize, slot: u32, offset: u64, len: usize, buf: IoBufMut, ctx: &mut Ctx) {
        let tag = u64::from(self.token) << 32 | u64::from(slot);
        match ctx.channels.get(bdev, ctx.target, ctx.registry) {
            Ok(ch) => ch.submit_read_buf(tag, offset, len, buf),
            Err(e) => self.channel_failed(bdev, slot, e, ctx),
        }
    }

    fn channel_failed(&mut self, bdev: usize, slot: u32, e: io::Error, ctx: &mut Ctx) {
        tracing::error!("cannot open a channel to bdev {}: {e}", ctx.target.bdev(bdev).info().name);
        self.on_completion(slot, Err(BdevError::Io(e.to_string())), ctx);
    }

    pub(super) fn start_io(&mut self, cmd: Command, data: IoBufMut, ctx: &mut Ctx) {
        let cid = cmd.cid();
        let ListenerKind::Subsystems(listener) = self.listener else { return };
        let Role::Io(q) = &mut self.role else { return };
        let write_cache = q.handle.write_cache.load(Ordering::Acquire);
        let view = q.cache.view(&q.subsystem, listener);
        let req = match decode_io(&view, &cmd, &data) {
            Ok(r) => r.under_write_cache(write_cache),
            Err(status) => return self.respond(Completion::new(cid, status), &[]),
        };
        // One lookup serves the bdev and the statistics. The view decode_io checked and the
        // namespace table may differ for an instant while a reload swaps them: then the
        // namespace is treated as gone.
        let table = q.cache.namespaces();
        let ns_found = table.iter().find(|n| n.info.nsid == cmd.nsid());
        if ns_found.is_none() && !matches!(req, IoRequest::Flush { .. } | IoRequest::Hint) {
            return self.respond(Completion::new(cid, Status::INVALID_NAMESPACE), &[]);
        }
        let ns_of = || ns_found.expect("checked above");
        // With the host's write cache off, writes without a FUA of their own are flushed.
        let durable = |ns: &crate::subsys::Namespace| (!write_cache && ns.info.volatile_cache).then_some(ns.bdev);
        let new = |kind, remaining, bytes| Inflight {
            cid,
            kind,
            remaining,
            status: Status::SUCCESS,
            bytes,
            data: Vec::new(),
            buffer: IoBuf::empty(),
            ns: ns_found.map(|n| n.stats.clone()),
            start: ctx.now,
            flush_after: None,
        };
        match req {
            IoRequest::Read { slba, blocks, .. } => {
                let ns = ns_of();
                let bs = u64::from(ns.info.block_size);
                let len = u64::from(blocks) * bs;
                let slot = self.alloc(new(IoKind::Read, 1, len));
                let registered = match &mut self.wire {
                    Wire::Tcp(_) => None,
                    #[cfg(feature = "rdma")]
                    Wire::Rdma(w) => w.registered_buffer(len as usize),
                };
                if let Some(buf) = registered {
                    return self.submit_read_buf(ns.bdev, slot, slba * bs, len as usize, buf, ctx);
                }
                let buf = match &mut self.wire {
                    Wire::Tcp(w) => w.take_read_buffer(),
                    #[cfg(feature = "rdma")]
                    Wire::Rdma(w) => w.take_read_buffer(),
                };
                self.submit_read(ns.bdev, slot, slba * bs, len as usize, buf, ctx);
            }
            IoRequest::Write { slba, fua, .. } => {
                let ns = ns_of();
                let bs = u64::from(ns.info.block_size);
                let slot = self.alloc(new(IoKind::Write, 1, data.len() as u64));
                if fua {
                    ns.stats.fua_writes.fetch_add(1, Ordering::Relaxed);
                }
                self.submit(ns.bdev, slot, BdevOp::Write { offset: slba * bs, data: data.freeze(), fua }, ctx);
            }
            IoRequest::Compare { slba, .. } => {
                let ns = ns_of();
                let bs = u64::from(ns.info.block_size);
                let slot = self.alloc(new(IoKind::Compare, 1, 0));
                self.submit(ns.bdev, slot, BdevOp::Compare { offset: slba * bs, expected: data.to_vec() }, ctx);
            }
            IoRequest::WriteZeroes { slba, blocks, .. } => {
                let ns = ns_of();
                let bs = u64::from(ns.info.block_size);
                let slot = self.alloc(Inflight { flush_after: durable(ns), ..new(IoKind::Other, 1, 0) });
                self.submit(ns.bdev, slot, BdevOp::WriteZeroes { offset: slba * bs, len: u64::from(blocks) * bs }, ctx);
            }
            IoRequest::Deallocate { ranges, .. } => {
                let ns = ns_of();
                let bs = u64::from(ns.info.block_size);
                let ranges: Vec<_> = ranges.into_iter().filter(|r| r.1 > 0).collect();
                if ranges.is_empty() {
                    return self.respond(Completion::new(cid, Status::SUCCESS), &[]);
                }
                let slot = self.alloc(Inflight { flush_after: durable(ns), ..new(IoKind::Other, ranges.len() as u32, 0) });
                for (slba, blocks) in ranges {
                    self.submit(ns.bdev, slot, BdevOp::Deallocate { offset: slba * bs, len: u64::from(blocks) * bs }, ctx);
                }
            }
            IoRequest::Hint => self.respond(Completion::new(cid, Status::SUCCESS), &[]),
            IoRequest::Flush { nsid } => {
                let bdevs: Vec<usize> = table
                    .iter()
                    .filter(|n| (nsid == 0xffff_ffff || n.info.nsid == nsid) && n.info.volatile_cache)
                    .map(|n| n.bdev)
                    .collect();
                if bdevs.is_empty() {
                    return self.respond(Completion::new(cid, Status::SUCCESS), &[]);
                }
                let slot = self.alloc(new(IoKind::Other, bdevs.len() as u32, 0));
                for n in table.iter().filter(|n| bdevs.contains(&n.bdev) && (nsid == 0xffff_ffff || n.info.nsid == nsid)) {
                    n.stats.flushes.fetch_add(1, Ordering::Relaxed);
                }
                for b in bdevs {
                    self.submit(b, slot, BdevOp::Flush, ctx);
                }
            }
        }
    }

    pub(super) fn start_compare_and_write(&mut self, compare: (Command, IoBufMut), write: (Command, IoBufMut), ctx: &mut Ctx) {
        let ListenerKind::Subsystems(listener) = self.listener else { return };
        let Role::Io(q) = &mut self.role else { return };
        let subsystem = q.subsystem.clone();
        let write_cache = q.handle.write_cache.load(Ordering::Acquire);
        let view = q.cache.view(&subsystem, listener);
        let (ccmd, cdata) = compare;
        let (wcmd, wdata) = write;
        if let Err(status) = decode_io(&view, &ccmd, &cdata).and_then(|_| decode_io(&view, &wcmd, &wdata)) {
            self.respond(Completion::new(ccmd.cid(), status), &[]);
            return self.respond(Completion::new(wcmd.cid(), Status::FUSED_FAILED), &[]);
        }
        let Some(ns) = subsystem.namespace(ccmd.nsid()) else {
            self.respond(Completion::new(ccmd.cid(), Status::INVALID_NAMESPACE), &[]);
            return self.respond(Completion::new(wcmd.cid(), Status::FUSED_FAILED), &[]);
        };
        let offset = ccmd.slba() * u64::from(ns.info.block_size);
        let bytes = wdata.len() as u64;
        let slot = self.alloc(Inflight {
            cid: ccmd.cid(),
            kind: IoKind::CompareAndWrite { write_cid: wcmd.cid() },
            remaining: 1,
            status: Status::SUCCESS,
            bytes,
            data: Vec::new(),
            buffer: IoBuf::empty(),
            ns: Some(ns.stats.clone()),
            start: ctx.now,
            // Compare and Write has no FUA of its own: with the cache off it is flushed.
            flush_after: (!write_cache && ns.info.volatile_cache).then_some(ns.bdev),
        });
        self.submit(ns.bdev, slot, BdevOp::CompareAndWrite { offset, expected: cdata.to_vec(), data: wdata.to_vec() }, ctx);
    }

    pub fn on_completion(&mut self, slot: u32, result: Result<BdevOutput, BdevError>, ctx: &mut Ctx) {
        let Some(Some(f)) = self.inflight.get_mut(slot as usize) else { return };
        match result {
            Ok(BdevOutput::Data(d)) => f.data = d,
            Ok(BdevOutput::Buffer(b)) => f.buffer = b,
            Ok(BdevOutput::Done) => {}
            Ok(BdevOutput::Miscompare) => f.status = Status::COMPARE_FAILURE,
            Err(e) => {
                let status = match (&e, &f.kind) {
                    (BdevError::OutOfRange { .. }, _) => Status::LBA_OUT_OF_RANGE,
                    (BdevError::NoSpace, _) => Status::CAPACITY_EXCEEDED,
                    (BdevError::Fenced, _) => Status::ANA_INACCESSIBLE,
                    (BdevError::Transition, _) => Status::ANA_TRANSITION,
                    (BdevError::Io(_), IoKind::Read | IoKind::Compare) => Status::UNRECOVERED_READ_ERROR,
                    (BdevError::Io(_), _) => Status::WRITE_FAULT,
                };
                tracing::error!(peer = %self.peer, cid = f.cid, "I/O failed: {e}");
                f.status = status;
            }
        }
        f.remaining -= 1;
        if f.remaining > 0 {
            return;
        }
        if let Some(bdev) = f.flush_after.take().filter(|_| f.status.is_success()) {
            // Durable before it completes: the flush finishes this command.
            f.remaining = 1;
            if let Some(st) = &f.ns {
                st.flushes.fetch_add(1, Ordering::Relaxed);
            }
            return self.submit(bdev, slot, BdevOp::Flush, ctx);
        }
        let f = self.inflight[slot as usize].take().expect("present");
        self.free_slots.push(slot);
        if let Some(st) = &f.ns {
            st.inflight.fetch_sub(1, Ordering::Relaxed);
            if !matches!(f.kind, IoKind::Other) {
                let write = matches!(f.kind, IoKind::Write | IoKind::CompareAndWrite { .. });
                st.record(write, f.bytes, f.status.is_success(), ctx.now.saturating_duration_since(f.start));
            }
        }
        if let Role::Io(q) = &self.role {
            let h = &q.subsystem.health;
            if f.status.is_success() {
                match f.kind {
                    IoKind::Read => {
                        h.read_commands.fetch_add(1, Ordering::Relaxed);
                        h.bytes_read.fetch_add(f.bytes, Ordering::Relaxed);
                    }
                    IoKind::Write | IoKind::CompareAndWrite { .. } => {
                        h.write_commands.fetch_add(1, Ordering::Relaxed);
                        h.bytes_written.fetch_add(f.bytes, Ordering::Relaxed);
                    }
                    _ => {}
                }
            }
        }
        match f.kind {
            IoKind::Shutdown => {
                let Role::Admin(q) = &mut self.role else { return };
                if f.status.is_success() {
                    q.ctrl.shutdown_complete();
                    tracing::info!(peer = %self.peer, cntlid = q.ctrl.cntlid, "shutdown complete");
                } else {
                    // Not reported complete: the host must not take its data for durable.
                    tracing::error!(peer = %self.peer, cntlid = q.ctrl.cntlid, "shutdown: a namespace flush failed; CSTS.SHST stays at processing");
                }
            }
            IoKind::CompareAndWrite { write_cid } => {
                let write_status = if f.status.is_success() { Status::SUCCESS } else { Status::FUSED_FAILED };
                self.respond(Completion::new(f.cid, f.status), &[]);
                self.respond(Completion::new(write_cid, write_status), &[]);
            }
            _ if f.status.is_success() && !f.buffer.is_empty() => self.respond_buffer(Completion::new(f.cid, f.status), f.buffer),
            _ if f.status.is_success() && !f.data.is_empty() => self.respond_data(Completion::new(f.cid, f.status), f.data),
            _ => self.respond(Completion::new(f.cid, f.status), &[]),
        }
    }
}
