//! Test helpers: a connected metro pair whose frames and local operations are pumped by hand.

use super::*;

pub(super) fn pair() -> (MirrorCore, MirrorCore) {
    let (mut a, out_a) = MirrorCore::new(Role::Preferred, 1, 1 << 20, Meta::new(1 << 20, 16), 1);
    let (mut b, _) = MirrorCore::new(Role::Secondary, 2, 1 << 20, Meta::new(1 << 20, 16), 2);
    a.set_metro(Metro::new("m", false, 1000), 1);
    b.set_metro(Metro::new("m", false, 1000), 1);
    drop(out_a);
    (a, b)
}

/// Moves frames between the two legs (and completes local operations) until nothing is
/// left; returns host completions (tag, success) by leg.
pub(super) fn pump(a: &mut MirrorCore, b: &mut MirrorCore, oa: Vec<Output>, ob: Vec<Output>) -> [Vec<(u64, bool)>; 2] {
    let cores = [a, b];
    let mut outs = [oa, ob];
    let mut done = [Vec::new(), Vec::new()];
    loop {
        let mut any = false;
        for from in 0..2 {
            for o in std::mem::take(&mut outs[from]) {
                any = true;
                let mut next = Vec::new();
                match o {
                    Output::Send(f) => {
                        cores[1 - from].handle(Input::Frame(f), &mut next);
                        outs[1 - from].extend(next);
                    }
                    Output::Local { id, op } => {
                        let result = Ok(if op.reads_only() { BdevOutput::Data(vec![0; 512]) } else { BdevOutput::Done });
                        cores[from].handle(Input::LocalDone { id, result }, &mut next);
                        outs[from].extend(next);
                    }
                    Output::Complete { tag, result } => done[from].push((tag, result.is_ok())),
                    Output::Witness(_) | Output::Persist => {}
                }
            }
        }
        if !any {
            return done;
        }
    }
}

pub(super) fn connected() -> (MirrorCore, MirrorCore) {
    let (mut a, mut b) = pair();
    let (mut oa, mut ob) = (Vec::new(), Vec::new());
    a.handle(Input::LinkUp, &mut oa);
    b.handle(Input::LinkUp, &mut ob);
    pump(&mut a, &mut b, oa, ob);
    let (mut oa, mut ob) = (Vec::new(), Vec::new());
    for t in [10, 20] {
        a.handle(Input::Tick { now_ms: t }, &mut oa);
        b.handle(Input::Tick { now_ms: t }, &mut ob);
    }
    pump(&mut a, &mut b, oa, ob);
    assert_eq!((a.status().link, b.status().link), (LinkState::Connected, LinkState::Connected));
    (a, b)
}

pub(super) fn witness_answers(c: &mut MirrorCore) {
    c.witness_seen_ms = Some(c.last_tick_ms);
}

pub(super) fn write(tag: u64) -> Input {
    Input::Host { tag, op: BdevOp::Write { offset: 0, data: vec![tag as u8; 512].into(), fua: false } }
}

/// The frames in `out` (taken out of it).
pub(super) fn frames(out: &mut Vec<Output>) -> Vec<Frame> {
    let (sent, rest): (Vec<Output>, Vec<Output>) = std::mem::take(out).into_iter().partition(|o| matches!(o, Output::Send(_)));
    *out = rest;
    sent.into_iter().filter_map(|o| if let Output::Send(f) = o { Some(f) } else { None }).collect()
}
