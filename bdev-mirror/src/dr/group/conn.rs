//! The group's connection to the DR site, on the group's thread: taking the dialer's connections,
//! the DR site's frames (its `Hello` decides between `Rebase` and `Resume`, or refuses; `Want`
//! and `Ack` drive the copy and the sequencer), sending through the emulated link delay, and
//! losing the connection (a refused DR site is dialled again after [`REFUSED_RETRY`]).

use super::*;

/// A DR site that was refused is dialled again after this.
const REFUSED_RETRY: Duration = Duration::from_secs(5);
/// A connection that lasts less than this is redialed only after as long.
const SHORT_CONNECTION: Duration = Duration::from_secs(1);

impl Engine {
    pub(super) fn send_copy_done(&mut self) {
        if let Some(seq) = self.copy_done_seq.filter(|_| self.greeted) {
            self.send(DrFrame::CopyDone { seq });
        }
    }

    /// A frame for the DR site, after the emulated delay if there is one.
    pub(super) fn send(&mut self, f: DrFrame) {
        if self.conn.is_none() {
            return;
        }
        if self.settings.link_delay.is_zero() && self.tx_delayed.is_empty() {
            if let Some(c) = self.conn.as_mut() {
                c.queue(&f);
            }
        } else {
            self.tx_delayed.push_back((Instant::now() + self.settings.link_delay, f));
        }
    }

    /// Frames whose emulated delay has passed go out.
    pub(super) fn send_due(&mut self) {
        let now = Instant::now();
        while self.tx_delayed.front().is_some_and(|(due, _)| *due <= now) {
            let (_, f) = self.tx_delayed.pop_front().expect("front");
            if let Some(c) = self.conn.as_mut() {
                c.queue(&f);
            }
        }
    }

    /// When the next delayed frame falls due.
    pub(super) fn next_due(&self) -> Option<Instant> {
        [self.tx_delayed.front().map(|d| d.0), self.rx_delayed.front().map(|d| d.0)].into_iter().flatten().min()
    }

    pub(super) fn conn_lost(&mut self, why: &str) {
        if let Some(mut c) = self.conn.take() {
            let _ = self.poll.registry().deregister(&mut c.sock);
            tracing::warn!(group = %self.settings.name, dr_site = %self.settings.dr_site, "DR stream connection lost: {why}");
        }
        // A connection the DR site ends at once (it drops what it cannot take) is not redialed
        // in a loop.
        let short = self.conn_started.take().is_some_and(|t| t.elapsed() < SHORT_CONNECTION);
        self.greeted = false;
        self.seq.disconnected();
        self.tx_delayed.clear();
        self.rx_delayed.clear();
        if self.refused.is_some() {
            // A DR site that was refused is asked again later, not at once.
            self.redial_at = Some(Instant::now() + REFUSED_RETRY);
        } else if short {
            self.redial_at = Some(Instant::now() + SHORT_CONNECTION);
        } else {
            self.want_conn.store(true, Ordering::Release);
        }
    }

    fn on_frame(&mut self, f: DrFrame) -> Result<(), String> {
        match f {
            DrFrame::Hello { applied_seq, producer } => {
                let other = producer != 0 && producer != self.producer;
                if self.settings.follows_metro {
                    if other || (self.fresh && applied_seq > 0) {
                        // Asked again now: a site that just lost the ordering never takes over.
                        if !self.feeds_now() {
                            return Err("this site no longer orders the writes: the other metro site feeds the DR site".into());
                        }
                        self.take_over(applied_seq, producer)?;
                    }
                } else if self.fresh && applied_seq > 0 {
                    return Err(format!(
                        "the DR site holds a stream (through write {applied_seq}) but this group is new (no state at {}): give it a new DR image (remove the DR site's state) or restore this site's state",
                        self.settings.state.display()
                    ));
                } else if other {
                    return Err(format!(
                        "the DR site holds the stream of another production site (producer {producer:#x}; this group is {:#x}): give this group a new DR image, or restore its state",
                        self.producer
                    ));
                }
                self.fresh = false;
                // Only the stream after the Rebase numbers past it: a DR site holding more took it.
                if self.rebase.is_some_and(|base| applied_seq > base) {
                    self.rebase = None;
                    let _ = self.persist(false);
                }
                if let Some(base) = self.rebase {
                    self.send(DrFrame::Rebase { seq: base, producer: self.producer });
                    self.greeted = true;
                    self.seq.connected(base, &mut self.out).map_err(|e| e.to_string())?;
                } else {
                    self.send(DrFrame::Resume { producer: self.producer });
                    self.greeted = true;
                    if let Some(after) = self.gap {
                        // Before anything past it is sent again.
                        self.send(DrFrame::Gap { seq: after });
                    }
                    self.seq.connected(applied_seq, &mut self.out).map_err(|e| e.to_string())?;
                }
                self.refused = None;
                tracing::info!(group = %self.settings.name, dr_site = %self.settings.dr_site, applied_seq, "DR stream connected");
                self.send_copy_done();
                Ok(())
            }
            DrFrame::Stopped => Err("the DR site's image stopped taking writes (a member's disk or its state failed): repair it and restart the DR site".into()),
            DrFrame::Promoted => Err("the DR site's image was promoted and serves hosts: it takes no stream (reverse replication is not built: give the group a new DR image)".into()),
            DrFrame::Want { member, offset, len } if self.greeted => {
                if member as usize >= self.member_size.len() || offset.checked_add(len).is_none_or(|end| end > self.member_size[member as usize]) {
                    return Err(format!("the DR site wants member {member} bytes {offset}+{len}, outside the group"));
                }
                if self.copy.is_none() {
                    // A copy declared done too early (its Want came after a reconnect): the DR
                    // site stays inconsistent until this one ends.
                    tracing::info!(group = %self.settings.name, member, offset, "the DR site asks for a region after the copy: copying it");
                }
                self.copy_again(member as usize, offset, len);
                Ok(())
            }
            DrFrame::Ack { seq } if self.greeted && self.rebase.is_some_and(|base| seq > base) => {
                // The DR site applied past the Rebase: it took it.
                self.rebase = None;
                if let Err(e) = self.persist(false) {
                    self.break_off(&format!("cannot store the group's state: {e}"));
                }
                self.seq.on_ack(seq, &mut self.out);
                Ok(())
            }
            DrFrame::Ack { seq } if self.greeted => {
                self.seq.on_ack(seq, &mut self.out);
                Ok(())
            }
            // Asked on a connection before this one's Hello reached the DR site: it asks again.
            DrFrame::Want { .. } => Ok(()),
            other => Err(format!("the DR site sent {other:?} out of turn")),
        }
    }

    pub(super) fn drive_conn(&mut self) -> bool {
        let mut work = false;
        if let Ok((sock, early)) = self.dialed.try_recv() {
            if self.standby || self.broken.is_some() {
                // Dialed before this site stood by (or stopped): the other site feeds it.
                return true;
            }
            match FramedConn::new(sock, early) {
                Ok(mut c) => {
                    if self.poll.registry().register(&mut c.sock, CONN, Interest::READABLE | Interest::WRITABLE).is_ok() {
                        self.conn = Some(c);
                        self.conn_started = Some(Instant::now());
                        self.greeted = false;
                        work = true;
                    } else {
                        self.want_conn.store(true, Ordering::Release);
                    }
                }
                Err(_) => self.want_conn.store(true, Ordering::Release),
            }
        }
        let Some(c) = self.conn.as_mut() else { return work };
        let mut frames = std::mem::take(&mut self.frames);
        let read = c.read_frames(&mut frames);
        work |= !frames.is_empty();
        if !self.settings.link_delay.is_zero() {
            let due = Instant::now() + self.settings.link_delay;
            self.rx_delayed.extend(frames.drain(..).map(|f| (due, f)));
            let now = Instant::now();
            while self.rx_delayed.front().is_some_and(|(at, _)| *at <= now) {
                frames.push(self.rx_delayed.pop_front().expect("front").1);
            }
        }
        let refused = crate::dr::link::each_frame(&mut frames, |f| self.on_frame(f));
        self.frames = frames;
        if let Some(why) = refused {
            tracing::error!(group = %self.settings.name, "DR site refused: {why}");
            self.refused = Some(why);
            self.conn_lost("refused");
            return true;
        }
        if let Err(e) = read {
            self.conn_lost(&e.to_string());
            return true;
        }
        work
    }

    pub(super) fn flush_conn(&mut self) {
        if let Some(c) = self.conn.as_mut() {
            if let Err(e) = c.flush() {
                self.conn_lost(&format!("write: {e}"));
            }
        }
    }
}
