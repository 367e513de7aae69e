//! Frames from the peer: leases (Ping/Pong), acknowledgements, forwarded writes, failures and
//! the resync stream.

use super::*;

impl MirrorCore {
    pub(super) fn on_frame(&mut self, f: Frame, out: &mut Vec<Output>) {
        match f.kind {
            Kind::Witness => self.on_witness_frame(&f, out),
            Kind::Switchover => self.on_switchover_frame(f, out),
            Kind::Bitmap => self.on_peer_bitmap(&f.payload, out),
            Kind::ResyncPlan if self.link == (LinkState::Syncing { source: false }) => {
                self.sync_total = f.offset;
                self.resynced_bytes = 0;
            }
            Kind::ResyncPlan => {}
            Kind::Hello if f.arg == HELLO_AGAIN && self.peer_reachable() => {
                // The peer's device failed and it asks for a resync: a new handshake on this
                // connection.
                out.push(Output::Send(self.hello_frame(0)));
                self.on_hello(&f, out);
            }
            Kind::Hello => self.on_hello(&f, out),
            Kind::Ping => {
                self.last_pong_sent_ms = Some(self.last_tick_ms);
                // (Bounded: an hour of lease is already absurd.)
                self.peer_fence_ms = self.peer_fence_ms.max(f.len.min(3_600_000));
                let mut p = Frame::new(Kind::Pong, f.seq);
                p.offset = f.offset;
                out.push(Output::Send(p));
            }
            // The echo of one of our Pings: the peer was alive after we sent it. An echo from the
            // future is not ours.
            Kind::Pong if f.offset <= self.last_tick_ms => {
                self.peer_lease_until_ms = self.peer_lease_until_ms.max(f.offset + self.fence());
            }
            Kind::Pong => {}
            Kind::Failed => self.peer_failed(f.arg, f.offset, f.len, out),
            Kind::Replicate if self.peer_reachable() || self.link == LinkState::Handshake => {
                let id = self.new_op(Origin::Replicated(f.seq), frame_op(f));
                self.admit(id, out);
            }
            Kind::ReplicateAck if f.arg == 1 => {
                // The secondary applied a forwarded write.
                if let Some((off, len)) = self.forwarded.remove(&f.seq) {
                    self.unconfirm(off, len);
                }
            }
            Kind::ReplicateAck => {
                let Some(o) = self.ops.get_mut(&f.seq) else { return };
                o.remote_pending = false;
                let range = o.range;
                if o.origin == Origin::Sweep {
                    if let Some(s) = self.sweep_flush.as_mut().filter(|s| s.id == f.seq) {
                        s.remote_ok = f.arg == status::OK;
                    }
                }
                if let Some((off, len)) = range {
                    self.unconfirm(off, len);
                }
                if f.arg != status::OK {
                    // The peer could not apply it: it is Failed, and this leg records that (a
                    // new generation, durable) before the write completes here; the region stays
                    // dirty until a resync.
                    let (off, len) = range.unwrap_or((0, 0));
                    self.peer_failed(f.arg, off, len, out);
                }
                self.try_finish(f.seq, out);
            }
            Kind::Forward => {
                // A switchover drains: held (the peer starts it itself once it orders).
                let Err(f) = self.hold_forward(f) else { return };
                // Only the ordering leg, on its own UpToDate device, executes forwarded commands.
                if !self.serving() || self.role != Role::Preferred || self.disk != DiskState::UpToDate {
                    let mut r = Frame::new(Kind::ForwardDone, f.seq);
                    r.arg = status::NOT_SERVING;
                    return out.push(Output::Send(r));
                }
                let id = self.new_op(Origin::Forwarded(f.seq), frame_op(f));
                self.admit(id, out);
            }
            Kind::ForwardDone => {
                // (Not waiting for an answer: a switchover made this leg order it meanwhile, and
                // this is the old orderer's refusal.)
                let Some(o) = self.ops.get_mut(&f.seq).filter(|o| o.stage == Stage::Forwarded) else { return };
                let Origin::Host(tag) = o.origin else { return };
                let remote_only = o.op.reads_only() || self.disk == DiskState::Failed;
                if remote_only && matches!(f.arg, status::OK | status::MISCOMPARE) {
                    // Served through the peer: its answer is the answer. A write is not applied
                    // here (this leg's device failed; the peer keeps the region dirty for the
                    // resync) but is confirmed, so the peer's bookkeeping moves on.
                    let result = match (&o.op, f.arg) {
                        (_, status::MISCOMPARE) => Ok(BdevOutput::Miscompare),
                        (BdevOp::Read { .. }, _) => Ok(BdevOutput::Data(f.payload.to_vec())),
                        _ => Ok(BdevOutput::Done),
                    };
                    let write = !o.op.reads_only();
                    self.ops.remove(&f.seq);
                    out.push(Output::Complete { tag, result });
                    if write {
                        let mut c = Frame::new(Kind::ReplicateAck, f.seq);
                        c.arg = 1; // confirms a forwarded write
                        out.push(Output::Send(c));
                    }
                } else if f.arg == status::OK {
                    o.stage = Stage::Queued;
                    self.admit(f.seq, out);
                } else {
                    let result = match f.arg {
                        status::MISCOMPARE => Ok(BdevOutput::Miscompare),
                        status::NOT_SERVING => Err(self.refusal()),
                        code => Err(code_error(code)),
                    };
                    self.ops.remove(&f.seq);
                    out.push(Output::Complete { tag, result });
                }
            }
            Kind::Resync if f.op == OpCode::None && f.arg == RESYNC_INCOMPLETE => {
                // A write failed here during the resync: still not a copy; the next retry tries
                // again.
                self.link = LinkState::Connected;
                self.disk = DiskState::Failed;
                self.meta.failed = true;
                self.last_retry_ms = self.last_tick_ms;
                out.push(Output::Persist);
            }
            Kind::Resync if f.op == OpCode::None && self.disk == DiskState::Failed => {
                // The source sent everything, but a write failed here after its last
                // acknowledgement left: this leg holds the source's generation except in its own
                // dirty regions (the failed ranges among them), which it keeps. The source learns
                // of the failure from our Failed frame and starts a new generation.
                self.meta.generations.current = f.offset;
                self.meta.generations.bitmap = 0;
                self.link = LinkState::Connected;
                self.last_retry_ms = self.last_tick_ms;
                out.push(Output::Persist);
            }
            Kind::Resync if f.op == OpCode::None => {
                // The source has sent everything: this leg is a faithful copy again.
                tracing::info!(
                    "resync from the peer finished: this leg is UpToDate{}",
                    if self.meta.failed { " (its device had failed)" } else { "" }
                );
                self.meta.failed = false;
                self.meta.inconsistent = false;
                self.failure = None;
                self.meta.generations.current = f.offset;
                self.meta.generations.bitmap = 0;
                self.disk = DiskState::UpToDate;
                self.link = LinkState::Connected;
                if self.role == Role::Secondary {
                    for w in self.meta.dirty.iter_mut() {
                        *w = 0;
                    }
                }
                if self.metro.as_ref().is_some_and(|m| m.manual_failback) && self.quorum != Quorum::Peer {
                    self.failback_hold = true;
                    self.why = "resynced: waiting for the operator's failback".into();
                }
                out.push(Output::Persist);
            }
            Kind::Resync => {
                // (Counted as it arrives: the target's view of the resync's progress.)
                self.resynced_bytes += f.len;
                let id = self.new_op(Origin::ResyncIn(f.seq), frame_op(f));
                self.admit(id, out);
            }
            Kind::ResyncAck => {
                let Some(o) = self.ops.get_mut(&f.seq).filter(|o| matches!(o.origin, Origin::ResyncOut(_)) && o.parts > 0) else {
                    return;
                };
                o.parts -= 1;
                if f.arg != status::OK && o.result.is_none() {
                    // The first chunk the target could not write: the region is not copied.
                    o.result = Some(Err(code_error(f.arg)));
                    self.sync_errors = true;
                    let (off, len) = o.range.unwrap_or((0, 0));
                    self.peer_failed(f.arg, off, len, out);
                }
                let Some(o) = self.ops.get(&f.seq).filter(|o| o.parts == 0) else { return };
                let (copied, range) = (o.result.is_none(), o.range);
                let Some(Op { origin: Origin::ResyncOut(region), .. }) = self.ops.remove(&f.seq) else { return };
                self.resync_inflight -= 1;
                if copied {
                    self.resynced_bytes += range.map_or(0, |r| r.1);
                    if self.unconfirmed.get(&region).copied().unwrap_or(0) == 0 {
                        self.meta.clear_dirty(region);
                        self.lazy_persist = true;
                    }
                }
                self.release(f.seq, out);
                self.pump_resync(out);
            }
            _ => {}
        }
    }
}
