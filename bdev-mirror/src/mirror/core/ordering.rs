//! Write ordering: range admission, issuing operations to the local leg and the peer, completing
//! them once every copy the mode promises has them; frames for operations.

use super::*;
use crate::IoBuf;

impl MirrorCore {
    pub(super) fn switch_role(&mut self, role: Role, out: &mut Vec<Output>) {
        let err = self.refusal();
        // Host writes in flight were started under the old role's rules: answer them (hosts
        // retry) and only release their ranges when the local halves end.
        let ids: Vec<u64> = self.ops.iter().filter(|(_, o)| matches!(o.origin, Origin::Host(_))).map(|(id, _)| *id).collect();
        for id in ids {
            let o = self.ops.get_mut(&id).expect("listed");
            if let Origin::Host(tag) = o.origin {
                out.push(Output::Complete { tag, result: Err(err.clone()) });
            }
            o.origin = Origin::Orphan;
            if o.stage != Stage::Running || o.local_done {
                self.ops.remove(&id);
                self.active.retain(|x| x.0 != id);
                self.waiting.retain(|x| *x != id);
            }
        }
        tracing::info!("mirror leg role: {:?} -> {:?}", self.role, role);
        self.role = role;
        if role == Role::Secondary {
            // Only the ordering leg survives by pre-election; its peer's deferral stays until
            // released over the link.
            self.armed = false;
        }
        // Roles changed by anything but the operator's switchover are no longer the operator's.
        self.meta.switched = false;
        // Durable, so a restart does not bring back the old role (two legs ordering writes).
        let configured = if self.configured_preferred { Role::Preferred } else { Role::Secondary };
        self.meta.ordering = (role != configured).then_some(role == Role::Preferred);
        out.push(Output::Persist);
    }

    /// Ends the wait of writes held since the peer was lost: complete them (this leg serves
    /// alone) or fail them (hosts retry where the data is served). A write replicated on the
    /// connection that is up now is not one of them: it completes with its peer's answer (a
    /// timer set when the previous connection was lost must not complete it without it).
    pub(super) fn release_held(&mut self, verdict: Result<(), BdevError>, out: &mut Vec<Output>) {
        let live = (self.link != LinkState::Down).then_some(self.link_epoch);
        let held: Vec<u64> = self
            .ops
            .iter()
            .filter(|(_, o)| o.remote_pending && (verdict.is_err() || o.sent_on.is_none() || o.sent_on != live))
            .map(|(id, _)| *id)
            .collect();
        for id in held {
            if let Some(o) = self.ops.get_mut(&id) {
                o.remote_pending = false;
                if let Err(e) = &verdict {
                    o.result = Some(Err(e.clone()));
                }
            }
            self.try_finish(id, out);
        }
    }

    pub(super) fn new_op(&mut self, origin: Origin, op: BdevOp) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let range = op.range();
        let epoch = self.link_epoch;
        self.ops.insert(
            id,
            Op {
                origin,
                op,
                range,
                stage: Stage::Queued,
                local_done: false,
                remote_pending: false,
                result: None,
                epoch,
                parts: 0,
                sent_on: None,
            },
        );
        id
    }

    pub(super) fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
        a.0 < b.0 + b.1.max(1) && b.0 < a.0 + a.1.max(1)
    }

    /// Whether `id` overlaps a running operation or one of `ahead` (earlier waiting ones).
    pub(super) fn conflicts<'a>(&self, id: u64, ahead: impl IntoIterator<Item = &'a u64>) -> bool {
        let Some(r) = self.ops[&id].range else { return false };
        self.active.iter().any(|(_, x)| x.is_some_and(|x| Self::overlaps(r, x)))
            || ahead.into_iter().any(|o| self.ops.get(o).and_then(|x| x.range).is_some_and(|x| Self::overlaps(r, x)))
    }

    /// Starts `id` when its range is free of running and earlier waiting operations.
    pub(super) fn admit(&mut self, id: u64, out: &mut Vec<Output>) {
        if self.conflicts(id, &self.waiting) {
            self.waiting.push_back(id);
        } else {
            self.active.push((id, self.ops[&id].range));
            self.begin(id, out);
        }
    }

    pub(super) fn release(&mut self, id: u64, out: &mut Vec<Output>) {
        self.active.retain(|x| x.0 != id);
        let mut still = VecDeque::new();
        while let Some(w) = self.waiting.pop_front() {
            if self.conflicts(w, &still) {
                still.push_back(w);
            } else {
                self.active.push((w, self.ops[&w].range));
                self.begin(w, out);
            }
        }
        self.waiting = still;
    }

    pub(super) fn mark(&mut self, range: Option<(u64, u64)>, out: &mut Vec<Output>) {
        if let Some((off, len)) = range {
            if self.meta.mark(off, len) {
                out.push(Output::Persist);
            }
        }
    }

    pub(super) fn on_host(&mut self, tag: u64, op: BdevOp, out: &mut Vec<Output>) {
        self.last_host_ms = Some(self.last_tick_ms);
        if !self.serving() {
            return out.push(Output::Complete { tag, result: Err(self.refusal()) });
        }
        let Err(op) = self.park(tag, op) else { return };
        let id = self.new_op(Origin::Host(tag), op);
        match self.role {
            Role::Preferred => self.admit(id, out),
            Role::Secondary => {
                let o = self.ops.get_mut(&id).expect("just added");
                o.stage = Stage::Forwarded;
                let f = op_frame(Kind::Forward, id, &o.op);
                out.push(Output::Send(f));
            }
        }
    }

    /// The operation has its range: issue it.
    pub(super) fn begin(&mut self, id: u64, out: &mut Vec<Output>) {
        let (origin, range, epoch) = {
            let o = &self.ops[&id];
            (o.origin, o.range, o.epoch)
        };
        if matches!(origin, Origin::Forwarded(_)) && epoch != self.link_epoch {
            // The peer forwarded it on an earlier connection and has answered its host since
            // (a write forwarded on a connection that ended fails there). Run now, it would put
            // on this leg a write the peer never gets, in a region the new connection's resync
            // may already have passed: the copies would differ. A no-op keeps the range until
            // the queue behind it moves on.
            let o = self.ops.get_mut(&id).expect("op");
            o.origin = Origin::Orphan;
            o.stage = Stage::Running;
            return out.push(Output::Local { id, op: BdevOp::Flush });
        }
        match (self.role, origin) {
            (Role::Preferred, Origin::Forwarded(_)) if self.ops[&id].op.reads_only() => {
                // A read for a peer serving through this leg: under the range lock (ordered with
                // the writes around it), nothing to mark or replicate.
                let o = self.ops.get_mut(&id).expect("op");
                o.stage = Stage::Running;
                let op = std::mem::replace(&mut o.op, BdevOp::Flush);
                out.push(Output::Local { id, op });
            }
            (Role::Preferred, Origin::Host(_) | Origin::Forwarded(_)) => {
                if !self.peer_reachable() {
                    if self.metro.is_some() && self.quorum != Quorum::Solo {
                        // The peer was lost while this write waited for its range, and this leg
                        // has not been granted to serve alone: it must not run. Answer the host
                        // (it retries where the data is served); a no-op keeps the range until
                        // the queue behind it moves on.
                        let err = self.refusal();
                        let o = self.ops.get_mut(&id).expect("op");
                        if let Origin::Host(tag) = o.origin {
                            out.push(Output::Complete { tag, result: Err(err) });
                        }
                        o.origin = Origin::Orphan;
                        o.stage = Stage::Running;
                        return out.push(Output::Local { id, op: BdevOp::Flush });
                    }
                    self.diverge(out);
                }
                self.mark(range, out);
                let reachable = self.replicating();
                let hold = self.alone_at_ms.is_some();
                let o = self.ops.get_mut(&id).expect("op");
                o.stage = Stage::Running;
                // Alone, but the peer's lease may not have run out yet: complete later.
                o.remote_pending |= hold && !reachable;
                let caw = matches!(o.op, BdevOp::CompareAndWrite { .. });
                // Replicate now, except compare-and-write (only if the compare succeeds) and
                // forwarded writes (the secondary applies its own copy on ForwardDone).
                if reachable && !caw && matches!(origin, Origin::Host(_)) {
                    o.remote_pending = true;
                    o.sent_on = Some(self.link_epoch);
                    let f = op_frame(Kind::Replicate, id, &o.op);
                    out.push(Output::Send(f));
                }
                if let Some((off, len)) = range {
                    for r in self.meta.regions_of(off, len) {
                        self.last_write.insert(r, self.last_tick_ms);
                        if reachable {
                            *self.unconfirmed.entry(r).or_default() += 1;
                        }
                    }
                }
                // The data is not needed here any more, except by a compare-and-write (which
                // replicates its data once the compare succeeds): move it rather than copy it.
                let o = self.ops.get_mut(&id).expect("op");
                let op =
                    if matches!(o.op, BdevOp::CompareAndWrite { .. }) { o.op.clone() } else { std::mem::replace(&mut o.op, BdevOp::Flush) };
                out.push(Output::Local { id, op });
            }
            (_, Origin::ResyncOut(_)) => {
                let o = self.ops.get_mut(&id).expect("op");
                o.stage = Stage::Running;
                let op = o.op.clone();
                out.push(Output::Local { id, op });
            }
            (_, _) => {
                // Applying what the source/preferred leg ordered (or, on the secondary, a host
                // write the preferred has executed).
                // The applying leg keeps no dirty regions of its own: only `written` matters.
                if let Some((off, len)) = range {
                    if self.meta.mark_written(off, len) {
                        out.push(Output::Persist);
                    }
                }
                let o = self.ops.get_mut(&id).expect("op");
                o.stage = Stage::Running;
                let op = match std::mem::replace(&mut o.op, BdevOp::Flush) {
                    BdevOp::CompareAndWrite { offset, data, .. } => BdevOp::Write { offset, data: data.into(), fua: false },
                    other => other,
                };
                out.push(Output::Local { id, op });
            }
        }
    }

    /// The preferred leg takes writes its peer will not see: start a new generation (once).
    pub(super) fn diverge(&mut self, out: &mut Vec<Output>) {
        if self.meta.generations.bitmap == 0 {
            let g = &mut self.meta.generations;
            g.history = g.bitmap;
            g.bitmap = g.current;
            let fresh = self.fresh_generation();
            self.meta.generations.current = fresh;
            out.push(Output::Persist);
        }
    }

    pub(super) fn on_local_done(&mut self, id: u64, result: Result<BdevOutput, BdevError>, out: &mut Vec<Output>) {
        if let (Err(e @ (BdevError::Io(_) | BdevError::NoSpace)), Some(o)) = (&result, self.ops.get(&id)) {
            let range = o.range;
            if matches!(o.origin, Origin::ResyncOut(_)) {
                self.sync_errors = true;
            }
            self.local_failed(e, range, out);
        }
        let reachable = self.replicating();
        let Some(o) = self.ops.get_mut(&id) else { return };
        o.local_done = true;
        let origin = o.origin;
        // Answers are owed only on the connection the operation came with.
        let answer = o.epoch == self.link_epoch;
        match origin {
            Origin::Orphan => {
                self.ops.remove(&id);
                self.release(id, out);
            }
            Origin::Host(_) if self.role == Role::Preferred => {
                let undecided = self.metro.is_some() && self.quorum != Quorum::Solo;
                if matches!(o.op, BdevOp::CompareAndWrite { .. })
                    && result == Ok(BdevOutput::Done)
                    && !reachable
                    && undecided
                    && o.result.is_none()
                {
                    // Written here after the peer was lost: held like every write waiting for
                    // the peer, until the election says whether this leg serves alone.
                    o.result = Some(result);
                    o.remote_pending = true;
                    return;
                }
                if matches!(o.op, BdevOp::CompareAndWrite { .. })
                    && result == Ok(BdevOutput::Done)
                    && reachable
                    && !o.remote_pending
                    && o.result.is_none()
                {
                    // The compare succeeded and the data is written here: now the peer.
                    o.result = Some(result);
                    o.remote_pending = true;
                    o.sent_on = Some(self.link_epoch);
                    let (offset, data) = match &o.op {
                        BdevOp::CompareAndWrite { offset, data, .. } => (*offset, IoBuf::from(&data[..])),
                        _ => unreachable!("checked above"),
                    };
                    let f = op_frame(Kind::Replicate, id, &BdevOp::Write { offset, data, fua: false });
                    out.push(Output::Send(f));
                    return;
                }
                if o.result.is_none() {
                    o.result = Some(result);
                }
                self.try_finish(id, out);
            }
            Origin::Forwarded(seq) => {
                let code = match &result {
                    Ok(BdevOutput::Miscompare) => status::MISCOMPARE,
                    Ok(_) => status::OK,
                    Err(e) => error_code(e),
                };
                let mut f = Frame::new(Kind::ForwardDone, seq);
                f.arg = code;
                let read = matches!(&result, Ok(BdevOutput::Data(_)));
                if let Ok(BdevOutput::Data(data)) = result {
                    f.payload = data.into();
                }
                if answer {
                    out.push(Output::Send(f));
                }
                if read {
                    // A forwarded read: no confirmation follows.
                } else if let (Some((off, len)), true, true) = (o.range, code == status::OK, answer) {
                    // (Only for an answer sent: a confirmation can only come on that connection.)
                    self.forwarded.insert(seq, (off, len));
                } else if let Some((off, len)) = o.range {
                    self.unconfirm(off, len);
                }
                self.ops.remove(&id);
                self.release(id, out);
            }
            Origin::Host(tag) => {
                // Secondary: the forwarded write is now applied here too. If this leg's device
                // failed it, the leg is Failed and fenced (recorded above, durable before this
                // completion): the host gets the fence's path error and retries at the peer,
                // which holds the write; never the device's error, which a host would not retry.
                let result = match result {
                    Err(BdevError::Io(_) | BdevError::NoSpace) => Err(self.refusal()),
                    r => r,
                };
                out.push(Output::Complete { tag, result });
                if answer {
                    let mut f = Frame::new(Kind::ReplicateAck, id);
                    f.arg = 1; // confirms a forwarded write
                    out.push(Output::Send(f));
                }
                self.ops.remove(&id);
                self.release(id, out);
            }
            Origin::Replicated(seq) | Origin::ResyncIn(seq) => {
                let kind = if matches!(origin, Origin::Replicated(_)) { Kind::ReplicateAck } else { Kind::ResyncAck };
                let mut f = Frame::new(kind, seq);
                f.arg = result.as_ref().map_or_else(error_code, |_| status::OK);
                if answer {
                    out.push(Output::Send(f));
                }
                self.ops.remove(&id);
                self.release(id, out);
            }
            Origin::Sweep => {
                let o = self.ops.get_mut(&id).expect("op");
                o.result = Some(result);
                self.try_finish(id, out);
            }
            Origin::ResyncOut(region) => {
                match result {
                    Ok(BdevOutput::Data(data)) if self.peer_reachable() => {
                        let offset = region << self.meta.region_shift;
                        let chunk_len = self.resync_chunk;
                        let chunks = data.chunks(chunk_len);
                        if let Some(o) = self.ops.get_mut(&id) {
                            o.parts = chunks.len() as u32;
                        }
                        for (i, chunk) in chunks.enumerate() {
                            let mut f = Frame::new(Kind::Resync, id);
                            // Durable on the target before it is acknowledged: the region's bit
                            // is cleared once every chunk was acknowledged.
                            f.flags = flags::FUA;
                            f.op = OpCode::Write;
                            f.offset = offset + (i * chunk_len) as u64;
                            f.len = chunk.len() as u64;
                            f.payload = IoBuf::from(chunk);
                            out.push(Output::Send(f));
                        }
                    }
                    _ => {
                        // Link gone or read failed: the region stays dirty for the next attempt.
                        self.resync_inflight -= 1;
                        self.ops.remove(&id);
                        self.release(id, out);
                    }
                }
            }
        }
    }

    pub(super) fn unconfirm(&mut self, off: u64, len: u64) {
        for r in self.meta.regions_of(off, len) {
            if let Some(c) = self.unconfirmed.get_mut(&r) {
                *c = c.saturating_sub(1);
            }
        }
    }

    /// Completes a preferred-leg host operation once local and remote halves are done.
    pub(super) fn try_finish(&mut self, id: u64, out: &mut Vec<Output>) {
        let o = &self.ops[&id];
        if !o.local_done || o.remote_pending {
            return;
        }
        let o = self.ops.remove(&id).expect("op");
        if o.origin == Origin::Sweep {
            if let Some(s) = self.sweep_flush.as_mut().filter(|s| s.id == id) {
                s.local_ok = o.result.as_ref().is_some_and(|r| r.is_ok());
            }
            self.finish_sweep(out);
        }
        if let Origin::Host(tag) = o.origin {
            out.push(Output::Complete { tag, result: o.result.unwrap_or(Ok(BdevOutput::Done)) });
        }
        self.release(id, out);
    }
}

pub(super) fn error_code(e: &BdevError) -> u32 {
    match e {
        BdevError::NoSpace => status::NO_SPACE,
        BdevError::OutOfRange { .. } => status::OUT_OF_RANGE,
        BdevError::Fenced | BdevError::Transition => status::NOT_SERVING,
        BdevError::Io(_) => status::IO_ERROR,
    }
}

pub(super) fn code_error(code: u32) -> BdevError {
    match code {
        status::NO_SPACE => BdevError::NoSpace,
        status::NOT_SERVING => BdevError::Fenced,
        _ => BdevError::Io(format!("peer reported error {code}")),
    }
}

/// A Replicate or Forward frame for an operation.
pub(super) fn op_frame(kind: Kind, seq: u64, op: &BdevOp) -> Frame {
    let mut f = Frame::new(kind, seq);
    match op {
        BdevOp::Write { offset, data, fua } => {
            f.op = OpCode::Write;
            f.offset = *offset;
            f.len = data.len() as u64;
            f.payload = data.clone();
            if *fua {
                f.flags |= flags::FUA;
            }
        }
        BdevOp::WriteZeroes { offset, len } => {
            f.op = OpCode::WriteZeroes;
            f.offset = *offset;
            f.len = *len;
        }
        BdevOp::Deallocate { offset, len } => {
            f.op = OpCode::Deallocate;
            f.offset = *offset;
            f.len = *len;
        }
        BdevOp::CompareAndWrite { offset, expected, data } => {
            f.op = OpCode::CompareAndWrite;
            f.offset = *offset;
            f.len = data.len() as u64;
            f.payload = [expected.as_slice(), data.as_slice()].concat().into();
        }
        BdevOp::Flush => f.op = OpCode::Flush,
        // Only forwarded (a leg serving through its peer), never replicated.
        BdevOp::Read { offset, len } => {
            f.op = OpCode::Read;
            f.offset = *offset;
            f.len = *len as u64;
        }
        BdevOp::Compare { offset, expected } => {
            f.op = OpCode::Compare;
            f.offset = *offset;
            f.len = expected.len() as u64;
            f.payload = IoBuf::from(&expected[..]);
        }
    }
    f
}

/// The operation a Replicate, Forward or Resync frame carries (its payload moves into it).
pub(super) fn frame_op(f: Frame) -> BdevOp {
    let len = usize::try_from(f.len).unwrap_or(usize::MAX);
    match f.op {
        OpCode::Write => BdevOp::Write { offset: f.offset, data: f.payload, fua: f.flags & flags::FUA != 0 },
        OpCode::WriteZeroes => BdevOp::WriteZeroes { offset: f.offset, len: f.len },
        OpCode::Deallocate => BdevOp::Deallocate { offset: f.offset, len: f.len },
        OpCode::CompareAndWrite if f.payload.len() == 2 * len => {
            let (expected, data) = f.payload.split_at(len);
            BdevOp::CompareAndWrite { offset: f.offset, expected: expected.to_vec(), data: data.to_vec() }
        }
        OpCode::Read => BdevOp::Read { offset: f.offset, len },
        OpCode::Compare => BdevOp::Compare { offset: f.offset, expected: f.payload.to_vec() },
        OpCode::Flush | OpCode::None | OpCode::CompareAndWrite => BdevOp::Flush,
    }
}
