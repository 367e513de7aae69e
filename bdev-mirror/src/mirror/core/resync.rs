//! Handshake and resync: who is the source (generations, failed disks), the union of both
//! legs' dirty bitmaps, sending dirty regions within the window and rate, and the sweep that
//! clears confirmed regions.
//!
//! Resync is a class of its own beside host I/O: regions travel in chunks of
//! [`RESYNC_CHUNK`] (a host frame never waits behind a whole region), the regions in flight
//! follow the hosts' write latency ([`super::pacing`]), `resync_rate` caps it, and the driver
//! sends resync data on a lane that yields to host frames and keeps the socket's queue near a
//! fill target.

use super::ordering::op_frame;
use super::*;

impl MirrorCore {
    /// This leg's Hello (who it is, what its data descends from); `arg` 0, or [`HELLO_AGAIN`].
    pub(super) fn hello_frame(&self, arg: u32) -> Frame {
        let hello = Hello {
            site: self.site,
            preferred: self.configured_preferred,
            caps: caps::ALL,
            orders: self.meta.switched && self.role == Role::Preferred,
            generations: self.meta.generations,
            disk: self.disk,
            size: self.size,
        };
        let mut f = Frame::new(Kind::Hello, 0);
        f.arg = arg;
        f.payload = hello.to_payload().into();
        f
    }

    pub(super) fn on_hello(&mut self, f: &Frame, out: &mut Vec<Output>) {
        let Some(peer) = Hello::from_payload(&f.payload) else {
            self.link = LinkState::Refused("malformed hello".into());
            return;
        };
        self.peer = Some(peer);
        if peer.size != self.size {
            self.link = LinkState::Refused(format!("peer device is {} bytes, this one {}", peer.size, self.size));
            return;
        }
        if peer.preferred == self.configured_preferred {
            self.link = LinkState::Refused("both legs have the same role; exactly one must be preferred".into());
            return;
        }
        let (mine, theirs) = (self.meta.generations, peer.generations);
        let dir = match mine.compare(&theirs) {
            // A resync whose end the target never saw: the source moved the target's generation
            // to its history; the target, torn (Inconsistent, durably), still holds it.
            SyncDirection::Unrelated if peer.disk == DiskState::Inconsistent && mine.history != 0 && mine.history == theirs.current => {
                SyncDirection::ThisIsSource
            }
            SyncDirection::Unrelated if self.disk == DiskState::Inconsistent && theirs.history != 0 && theirs.history == mine.current => {
                SyncDirection::PeerIsSource
            }
            dir => dir,
        };
        let source = match dir {
            // In sync, the configured preferred orders, unless a switchover gave it to one leg.
            SyncDirection::InSync => {
                let orders = self.meta.switched && self.role == Role::Preferred;
                if orders != peer.orders {
                    orders
                } else {
                    self.configured_preferred
                }
            }
            SyncDirection::ThisIsSource | SyncDirection::FullToPeer => true,
            SyncDirection::PeerIsSource | SyncDirection::FullFromPeer => false,
            SyncDirection::SplitBrain | SyncDirection::Unrelated => {
                self.link = LinkState::Refused(format!("{dir:?}: the legs' data diverged; resolve by discarding one leg"));
                tracing::error!("mirror peer refused: {dir:?}");
                return;
            }
        };
        // Same lineage: a leg that holds no whole copy (its device Failed, or a resync into it
        // was cut short: its generations are still those of the source) is never the source.
        let torn = |d: DiskState| matches!(d, DiskState::Failed | DiskState::Inconsistent);
        let source = match (dir, torn(self.disk), torn(peer.disk)) {
            (SyncDirection::InSync, true, true) => {
                let why = if self.disk == DiskState::Failed && peer.disk == DiskState::Failed {
                    "both legs' devices failed"
                } else {
                    "neither leg holds a whole copy (a device failed, a resync was cut short)"
                };
                self.link = LinkState::Refused(why.into());
                return;
            }
            (SyncDirection::InSync, true, false) => false,
            (SyncDirection::InSync, false, true) => true,
            _ => source,
        };
        if matches!(self.quorum, Quorum::Electing { .. }) {
            // The peer is back before the election ended: the handshake decides. A grant held
            // back meanwhile is dropped (the witness heals it once both legs report in sync).
            self.quorum = Quorum::Starting;
            self.pending_grant = None;
            self.why = "peer back during the election".into();
            // Writes held for the verdict never reached the peer: hosts retry them (their regions
            // are dirty, so the resync covers whatever this leg applied).
            self.release_held(Err(BdevError::Transition), out);
        }
        // The sync source orders writes (after a failover that may be the configured secondary).
        let role = if source { Role::Preferred } else { Role::Secondary };
        if role != self.role {
            self.switch_role(role, out);
        }
        if source {
            if dir == SyncDirection::FullToPeer {
                self.meta.dirty_all_written();
            }
            self.to_sync = (0..self.meta.regions).filter(|r| self.meta.is_dirty(*r)).collect();
            self.sync_cursor = 0;
            self.sync_total = self.to_sync.len() as u64 * (1u64 << self.meta.region_shift);
            self.resynced_bytes = 0;
            self.sync_errors = false;
            self.link = LinkState::Syncing { source: true };
            tracing::info!("resync to the peer starting: {} regions dirty here (the peer's bitmap adds its own)", self.to_sync.len());
            // Wait for the target's bitmap: it may have written regions this leg never saw.
            self.awaiting_bitmap = true;
        } else {
            // A Failed leg is no whole copy until a resync ends, even with nothing dirty here (its
            // failed ranges were copied to the peer while it was the source of the peer's resync).
            if dir != SyncDirection::InSync || self.meta.dirty_count() > 0 || self.disk == DiskState::Failed {
                self.disk = DiskState::Inconsistent;
                // Durable before the first chunk lands: a restart mid-resync is not a whole copy.
                if !self.meta.inconsistent {
                    self.meta.inconsistent = true;
                    out.push(Output::Persist);
                }
            }
            self.link = LinkState::Syncing { source: false };
            let mut f = Frame::new(Kind::Bitmap, 0);
            f.payload = self.meta.dirty.iter().flat_map(|w| w.to_le_bytes()).collect::<Vec<u8>>().into();
            out.push(Output::Send(f));
        }
    }

    /// Source: the target's dirty regions join the resync.
    pub(super) fn on_peer_bitmap(&mut self, payload: &[u8], out: &mut Vec<Output>) {
        if !self.awaiting_bitmap || self.link != (LinkState::Syncing { source: true }) {
            return;
        }
        self.awaiting_bitmap = false;
        let mut added = false;
        for (i, chunk) in payload.chunks_exact(8).enumerate().take(self.meta.dirty.len()) {
            let w = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
            added |= w & !self.meta.dirty[i] != 0;
            self.meta.dirty[i] |= w;
        }
        if added {
            out.push(Output::Persist);
        }
        // Everything dirty now: this leg's bits (including writes since the Hello) and the peer's.
        self.to_sync = (0..self.meta.regions).filter(|r| self.meta.is_dirty(*r)).collect();
        self.sync_cursor = 0;
        self.sync_total = self.to_sync.len() as u64 * (1u64 << self.meta.region_shift);
        let mut plan = Frame::new(Kind::ResyncPlan, 0);
        plan.offset = self.sync_total;
        out.push(Output::Send(plan));
        self.pump_resync(out);
    }

    /// Sends the next dirty regions, within the window and the rate budget.
    pub(super) fn pump_resync(&mut self, out: &mut Vec<Output>) {
        if self.link != (LinkState::Syncing { source: true }) || self.awaiting_bitmap {
            return;
        }
        let region_len = 1u64 << self.meta.region_shift;
        // Hosts writing: a narrow window (the rate, if set, caps it further).
        let hosts_writing = self.last_host_ms.is_some_and(|t| self.last_tick_ms.saturating_sub(t) < HOST_ACTIVE_MS);
        let window = self.pacer.window(hosts_writing);
        while self.resync_inflight < window && self.sync_cursor < self.to_sync.len() {
            if self.resync_rate > 0 {
                if self.tokens < region_len.min(self.resync_rate) {
                    return;
                }
                self.tokens -= region_len.min(self.tokens);
            }
            let region = self.to_sync[self.sync_cursor];
            self.sync_cursor += 1;
            let offset = region << self.meta.region_shift;
            let len = region_len.min(self.size - offset);
            self.resync_inflight += 1;
            let id = self.new_op(Origin::ResyncOut(region), BdevOp::Read { offset, len: len as usize });
            self.admit(id, out);
        }
        if self.sync_cursor >= self.to_sync.len() && self.resync_inflight == 0 && self.sync_errors {
            // A region could not be copied: it stays dirty, the target stays Failed (and
            // retries), this leg keeps its diverged generation.
            let mut f = Frame::new(Kind::Resync, 0);
            f.arg = RESYNC_INCOMPLETE;
            out.push(Output::Send(f));
            self.link = LinkState::Connected;
            self.to_sync.clear();
            tracing::warn!("mirror resync ended with regions not copied; they stay dirty");
            return;
        }
        if self.sync_cursor >= self.to_sync.len() && self.resync_inflight == 0 {
            // Everything sent and acknowledged: the peer is a faithful copy again.
            tracing::info!("resync to the peer finished: {} bytes copied; the peer is UpToDate", self.resynced_bytes);
            self.peer_failure = None;
            let mut f = Frame::new(Kind::Resync, 0);
            f.offset = self.meta.generations.current;
            out.push(Output::Send(f));
            // Kept as history: should the peer never see this last frame (a crash, a cut), it
            // returns torn with the generation it had, which only this tells apart from unrelated
            // data (see `on_hello`).
            let g = &mut self.meta.generations;
            g.history = std::mem::take(&mut g.bitmap);
            self.link = LinkState::Connected;
            if self.disk == DiskState::Outdated {
                // Outdated only by a lost election in the same lineage: both copies now match.
                self.disk = DiskState::UpToDate;
            }
            self.to_sync.clear();
            if let Some(p) = self.peer.as_mut() {
                p.disk = DiskState::UpToDate;
            }
            out.push(Output::Persist);
        }
    }

    /// Clears dirty bits of regions the peer has fully confirmed (preferred leg, in sync).
    pub(super) fn sweep(&mut self, out: &mut Vec<Output>) {
        // A Failed peer confirms nothing: every region stays dirty until its resync.
        if self.role != Role::Preferred
            || self.link != LinkState::Connected
            || self.peer.is_none()
            || self.peer_failure.is_some()
            || self.handover.is_some()
        {
            if std::mem::take(&mut self.lazy_persist) {
                out.push(Output::Persist);
            }
            return;
        }
        if std::mem::take(&mut self.lazy_persist) {
            out.push(Output::Persist);
        }
        if self.sweep_flush.is_some() {
            return;
        }
        let now = self.last_tick_ms;
        self.unconfirmed.retain(|_, c| *c > 0);
        let regions: Vec<u64> = (0..self.meta.regions)
            .filter(|r| {
                let idle = self.last_write.get(r).is_none_or(|t| now.saturating_sub(*t) >= self.activity_idle_ms);
                idle && self.meta.is_dirty(*r) && !self.unconfirmed.contains_key(r)
            })
            .collect();
        if regions.is_empty() {
            return;
        }
        // Confirmed writes may still sit in either device's volatile cache: a bit is cleared only
        // once a flush of both legs, started after the region's last write, has completed.
        let id = self.new_op(Origin::Sweep, BdevOp::Flush);
        let o = self.ops.get_mut(&id).expect("just added");
        o.stage = Stage::Running;
        o.remote_pending = true;
        o.sent_on = Some(self.link_epoch);
        self.sweep_flush = Some(SweepFlush { id, regions, started_ms: now, local_ok: false, remote_ok: false });
        out.push(Output::Send(op_frame(Kind::Replicate, id, &BdevOp::Flush)));
        out.push(Output::Local { id, op: BdevOp::Flush });
    }

    /// The sweep's flushes ended (or the peer was lost meanwhile): clear what is still clean.
    pub(super) fn finish_sweep(&mut self, out: &mut Vec<Output>) {
        let Some(s) = self.sweep_flush.take() else { return };
        if !(s.local_ok && s.remote_ok) || self.role != Role::Preferred || self.peer_failure.is_some() {
            return;
        }
        let mut cleared = false;
        for r in s.regions {
            let untouched = self.last_write.get(&r).is_none_or(|t| *t < s.started_ms);
            if untouched && self.meta.is_dirty(r) && !self.unconfirmed.contains_key(&r) {
                self.meta.clear_dirty(r);
                self.last_write.remove(&r);
                cleared = true;
            }
        }
        if cleared {
            out.push(Output::Persist);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testkit::*;
    use super::*;

    #[test]
    fn a_target_that_missed_the_end_of_its_resync_is_resynced_again_not_refused() {
        // A finished a resync into B (B's generation moved to A's history); B never saw the
        // last frame and restarts torn, with its old generation.
        let mut ma = Meta::new(1 << 20, 16);
        ma.generations = crate::mirror::meta::Generations { current: 0x99, bitmap: 0, history: 0x77 };
        let mut mb = Meta::new(1 << 20, 16);
        mb.generations.current = 0x77;
        mb.inconsistent = true;
        let (mut a, _) = MirrorCore::new(Role::Preferred, 1, 1 << 20, ma, 1);
        let (mut b, _) = MirrorCore::new(Role::Secondary, 2, 1 << 20, mb, 2);
        assert_eq!(b.disk, DiskState::Inconsistent);
        let (mut oa, mut ob) = (Vec::new(), Vec::new());
        a.handle(Input::LinkUp, &mut oa);
        b.handle(Input::LinkUp, &mut ob);
        pump(&mut a, &mut b, oa, ob);
        let (mut oa, mut ob) = (Vec::new(), Vec::new());
        for t in [10, 20, 1100, 1200] {
            a.handle(Input::Tick { now_ms: t }, &mut oa);
            b.handle(Input::Tick { now_ms: t }, &mut ob);
        }
        pump(&mut a, &mut b, oa, ob);
        assert_eq!((a.status().link, b.status().link), (LinkState::Connected, LinkState::Connected));
        assert_eq!(b.disk, DiskState::UpToDate, "resynced from A");
        assert_eq!(b.meta.generations.current, 0x99);
    }
}
