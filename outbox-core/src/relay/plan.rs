//! The pure part of a batch: which claimed rows form a unit, which crash-loop suspect is
//! published alone, which rows each wave sends, and what a wave's results mean for each unit.
//! No store, no publisher, no clock: [`step`](super::step) makes the calls, and every rule
//! here is tested on its own below.

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::message::{Envelope, StoredMessage};
use crate::store::{Failure, Outcome};
use crate::strategy::Order;

/// A row given back without an attempt (behind a stopped head, out of lease, or set aside
/// for a suspect).
pub(crate) fn release(seq: i64) -> Failure {
    Failure {
        seq,
        error: String::new(),
        outcome: Outcome::Release,
    }
}

/// Groups a claim's rows into units: a keep-order unit is every claimed row of one
/// (stream, unit), in claim (seq) order; each publish-on-commit row is a unit of its own.
/// Units keep the order of their first rows.
pub(crate) fn units(messages: Vec<StoredMessage>) -> Vec<Vec<StoredMessage>> {
    let mut units: Vec<Vec<StoredMessage>> = Vec::new();
    let mut index: HashMap<(String, String), usize> = HashMap::new();
    for m in messages {
        if m.order != Order::InUnit {
            units.push(vec![m]);
            continue;
        }
        let (stream, unit) = m.ordering_unit();
        let key = (stream.to_owned(), unit.to_owned());
        match index.get(&key) {
            Some(&u) => units[u].push(m),
            None => {
                index.insert(key, units.len());
                units.push(vec![m]);
            }
        }
    }
    units
}

/// What [`isolate_suspect`] set aside.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Isolated {
    /// Rows of the other units: given back before the suspect is published, so that only the
    /// row in flight keeps counting if it crashes this relay too.
    pub given_back: Vec<i64>,
    /// The rest of the suspect's unit: waits behind it (recorded with the batch).
    pub behind: Vec<i64>,
}

/// Crash loops. A row (a keep-order row: its unit) claimed before without an outcome is a
/// suspect: the relay that took it stopped while publishing it (a crash, a kill, a lost
/// database), perhaps because of it. When the batch holds suspects, only the head of the one
/// with the lowest seq stays in `units`; the rest is returned.
pub(crate) fn isolate_suspect(units: &mut Vec<Vec<StoredMessage>>) -> Option<Isolated> {
    let su = (0..units.len())
        .filter(|&u| units[u][0].claims >= 2)
        .min_by_key(|&u| units[u][0].seq)?;
    let mut suspect = units.swap_remove(su);
    let behind = suspect.split_off(1).iter().map(|m| m.seq).collect();
    let given_back = units.iter().flatten().map(|m| m.seq).collect();
    *units = vec![suspect];
    Some(Isolated { given_back, behind })
}

/// One wave: the next row of every unit still going, or, to a publisher that keeps a
/// batch's order, the unit's run to one destination.
#[derive(Debug)]
pub(crate) struct Wave<'m, R> {
    /// What to publish, run after run.
    pub envelopes: Vec<&'m Envelope>,
    /// `(unit, run length)`, in the order of `envelopes`.
    pub runs: Vec<(usize, usize)>,
    /// Heads refused before publishing, and why; their units stop in this wave.
    pub refused: Vec<(&'m StoredMessage, R)>,
}

/// What a wave's result says about one row.
#[derive(Debug)]
pub(crate) enum RowResult<'m> {
    /// Published; the unit goes on.
    Published(&'m StoredMessage),
    /// Failed; its unit stops here (the rows behind it are given back).
    Failed(&'m StoredMessage, Error),
    /// The publisher took a later row of the unit after refusing this one (an order gap: the
    /// publisher broke [`Publisher::ordered_batches`](crate::Publisher::ordered_batches)).
    Gap(&'m StoredMessage),
}

/// The waves of a batch. Wave k holds the k-th row of every unit still going, so a unit's
/// next row is sent only after the previous one was acknowledged.
#[derive(Debug)]
pub(crate) struct Waves<'m> {
    units: &'m [Vec<StoredMessage>],
    /// Per unit: its next row.
    cursor: Vec<usize>,
    /// Units with rows left, in unit order.
    alive: Vec<usize>,
    /// Units stopped in the current wave.
    stopped: Vec<usize>,
}

impl<'m> Waves<'m> {
    /// Waves over every unit.
    pub fn new(units: &'m [Vec<StoredMessage>]) -> Self {
        Self {
            units,
            cursor: vec![0; units.len()],
            alive: (0..units.len()).collect(),
            stopped: Vec::new(),
        }
    }

    /// No wave at all (a suspect failed without being published).
    pub fn none(units: &'m [Vec<StoredMessage>]) -> Self {
        let mut waves = Self::new(units);
        waves.alive.clear();
        waves
    }

    /// Every unit finished or stopped.
    pub fn is_done(&self) -> bool {
        self.alive.is_empty()
    }

    /// Rows no wave has taken yet.
    pub fn remaining(&self) -> impl Iterator<Item = &'m StoredMessage> + '_ {
        let units = self.units;
        self.alive
            .iter()
            .flat_map(move |&u| &units[u][self.cursor[u]..])
    }

    /// The next wave. `refuse` says why a row may not go (it does not verify, or the
    /// publisher would refuse it): a refused head stops its unit; later in a run, the rows
    /// before it go first and the next wave starts at it. No later row of a unit goes out in
    /// the batch where an earlier one is refused.
    pub fn next<R>(
        &mut self,
        ordered: bool,
        mut refuse: impl FnMut(&'m StoredMessage) -> Option<R>,
    ) -> Wave<'m, R> {
        let units = self.units;
        let mut wave = Wave {
            envelopes: Vec::new(),
            runs: Vec::with_capacity(self.alive.len()),
            refused: Vec::new(),
        };
        for &u in &self.alive {
            let unit = &units[u][self.cursor[u]..];
            let head = &unit[0];
            // A head that failed before goes alone until it passes.
            let max = if ordered && head.attempts == 0 {
                unit.len()
            } else {
                1
            };
            let mut len = 0;
            while len < max {
                let m = &unit[len];
                if m.envelope.message.destination != head.envelope.message.destination {
                    break; // a broker orders a destination's messages, not two's
                }
                match refuse(m) {
                    None => {
                        wave.envelopes.push(&m.envelope);
                        len += 1;
                    }
                    Some(why) => {
                        if len == 0 {
                            wave.refused.push((m, why));
                            self.stopped.push(u);
                        }
                        break;
                    }
                }
            }
            if len > 0 {
                wave.runs.push((u, len));
            }
        }
        wave
    }

    /// A wave's publish results, one per envelope: a run stops at its first failure, and a
    /// row the publisher took after that is a gap. Too few results count as failures.
    pub fn apply(
        &mut self,
        runs: &[(usize, usize)],
        results: Vec<Result<()>>,
    ) -> Vec<RowResult<'m>> {
        let units = self.units;
        let mut results = results.into_iter();
        let mut out = Vec::new();
        for &(u, len) in runs {
            let mut failed = false;
            for _ in 0..len {
                let result = results.next().unwrap_or_else(|| {
                    Err(Error::transient("the publisher returned too few results"))
                });
                let m = &units[u][self.cursor[u]];
                match result {
                    Ok(()) if failed => out.push(RowResult::Gap(m)),
                    Err(_) if failed => {}
                    Ok(()) => {
                        out.push(RowResult::Published(m));
                        self.cursor[u] += 1;
                    }
                    Err(error) => {
                        out.push(RowResult::Failed(m, error));
                        self.stopped.push(u);
                        failed = true;
                    }
                }
            }
        }
        out
    }

    /// Ends the wave: the rows behind a stopped unit's head are returned (given back), and
    /// finished units leave.
    pub fn finish(&mut self) -> Vec<&'m StoredMessage> {
        let units = self.units;
        let mut behind = Vec::new();
        for u in std::mem::take(&mut self.stopped) {
            behind.extend(&units[u][self.cursor[u] + 1..]);
            self.cursor[u] = units[u].len();
        }
        self.alive.retain(|&u| self.cursor[u] < units[u].len());
        behind
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{Message, MessageId, Status};
    use crate::strategy::Exhausted;
    use std::time::SystemTime;

    fn row(seq: i64, stream: &str, unit: &str, order: Order) -> StoredMessage {
        StoredMessage {
            seq,
            envelope: Envelope {
                id: MessageId::new(),
                created_at: SystemTime::UNIX_EPOCH,
                message: Message::new("dest", vec![]).stream(stream),
            },
            order,
            unit: unit.to_owned(),
            exhausted: Exhausted::Default,
            status: Status::Pending,
            attempts: 0,
            next_attempt_at: SystemTime::UNIX_EPOCH,
            last_error: None,
            sent_at: None,
            signature: None,
            claims: 1,
        }
    }

    fn keep(seq: i64, unit: &str) -> StoredMessage {
        row(seq, "s", unit, Order::InUnit)
    }

    fn seqs(unit: &[StoredMessage]) -> Vec<i64> {
        unit.iter().map(|m| m.seq).collect()
    }

    fn all(units: &[Vec<StoredMessage>]) -> Vec<Vec<i64>> {
        units.iter().map(|u| seqs(u)).collect()
    }

    #[test]
    fn a_unit_is_one_stream_and_key_and_unordered_rows_go_alone() {
        let rows = vec![
            keep(1, "a"),
            row(2, "s", "", Order::Unordered),
            keep(3, "b"),
            keep(4, "a"),
            row(5, "t", "a", Order::InUnit), // another stream: another unit
            row(6, "s", "", Order::Unordered),
            keep(7, "b"),
        ];
        assert_eq!(
            all(&units(rows)),
            vec![vec![1, 4], vec![2], vec![3, 7], vec![5], vec![6]]
        );
    }

    #[test]
    fn the_lowest_suspect_goes_alone() {
        let mut rows = vec![keep(1, "a"), keep(2, "b"), keep(3, "a"), keep(4, "c")];
        rows[1].claims = 2; // b
        rows[3].claims = 3; // c
        let mut u = units(rows);
        let isolated = isolate_suspect(&mut u).expect("a suspect");
        assert_eq!(all(&u), vec![vec![2]]);
        assert_eq!(isolated.behind, Vec::<i64>::new());
        let mut given_back = isolated.given_back;
        given_back.sort();
        assert_eq!(given_back, vec![1, 3, 4]);

        let mut rows = vec![keep(1, "a"), keep(2, "a"), keep(3, "b")];
        rows[0].claims = 2;
        let mut u = units(rows);
        let isolated = isolate_suspect(&mut u).expect("a suspect");
        assert_eq!(all(&u), vec![vec![1]]);
        assert_eq!(
            isolated,
            Isolated {
                given_back: vec![3],
                behind: vec![2]
            }
        );

        let mut u = units(vec![keep(1, "a"), keep(2, "b")]);
        assert_eq!(isolate_suspect(&mut u), None);
        assert_eq!(all(&u), vec![vec![1], vec![2]]);
    }

    fn wave_seqs<R>(w: &Wave<'_, R>) -> Vec<(usize, usize)> {
        w.runs.clone()
    }

    #[test]
    fn waves_send_one_row_per_unit_unless_the_publisher_keeps_order() {
        let u = units(vec![keep(1, "a"), keep(2, "a"), keep(3, "b"), keep(4, "a")]);
        let mut w = Waves::new(&u);
        let mut sent = Vec::new();
        while !w.is_done() {
            let wave = w.next::<()>(false, |_| None);
            assert!(wave.runs.iter().all(|&(_, len)| len == 1));
            sent.push(wave.envelopes.len());
            let results = wave.envelopes.iter().map(|_| Ok(())).collect();
            w.apply(&wave.runs, results);
            assert!(w.finish().is_empty());
        }
        assert_eq!(sent, vec![2, 1, 1]);

        let mut w = Waves::new(&u);
        let wave = w.next::<()>(true, |_| None);
        assert_eq!(wave_seqs(&wave), vec![(0, 3), (1, 1)]);
    }

    #[test]
    fn a_run_stops_at_another_destination_and_at_a_head_that_failed_before() {
        let mut rows = vec![
            keep(1, "a"),
            keep(2, "a"),
            keep(3, "a"),
            keep(4, "b"),
            keep(5, "b"),
        ];
        rows[2].envelope.message.destination = "other".into();
        rows[3].attempts = 1;
        let u = units(rows);
        let mut w = Waves::new(&u);
        let wave = w.next::<()>(true, |_| None);
        assert_eq!(wave_seqs(&wave), vec![(0, 2), (1, 1)]);
    }

    #[test]
    fn a_refused_head_stops_its_unit_and_a_refusal_inside_a_run_cuts_it() {
        let u = units(vec![
            keep(1, "a"),
            keep(2, "a"),
            keep(3, "b"),
            keep(4, "b"),
            keep(5, "b"),
        ]);
        let mut w = Waves::new(&u);
        let wave = w.next(true, |m| (m.seq == 1 || m.seq == 4).then_some("no"));
        assert_eq!(wave_seqs(&wave), vec![(1, 1)]);
        assert_eq!(wave.refused.len(), 1);
        assert_eq!(wave.refused[0].0.seq, 1);
        let results = wave.envelopes.iter().map(|_| Ok(())).collect();
        let r = w.apply(&wave.runs, results);
        assert!(matches!(r[..], [RowResult::Published(m)] if m.seq == 3));
        assert_eq!(seqs_of(w.finish()), vec![2]);
        // Unit b starts its next wave at the refused row, which is now its head.
        let wave = w.next(true, |m| (m.seq == 4).then_some("no"));
        assert!(wave.runs.is_empty());
        assert_eq!(wave.refused[0].0.seq, 4);
        assert_eq!(seqs_of(w.finish()), vec![5]);
        assert!(w.is_done());
    }

    fn seqs_of(rows: Vec<&StoredMessage>) -> Vec<i64> {
        rows.iter().map(|m| m.seq).collect()
    }

    #[test]
    fn a_failure_stops_its_run_and_a_later_success_is_a_gap() {
        let u = units(vec![keep(1, "a"), keep(2, "a"), keep(3, "a"), keep(4, "b")]);
        let mut w = Waves::new(&u);
        let wave = w.next::<()>(true, |_| None);
        let results = vec![Ok(()), Err(Error::transient("refused")), Ok(()), Ok(())];
        let r = w.apply(&wave.runs, results);
        let kinds: Vec<(char, i64)> = r
            .iter()
            .map(|r| match r {
                RowResult::Published(m) => ('p', m.seq),
                RowResult::Failed(m, _) => ('f', m.seq),
                RowResult::Gap(m) => ('g', m.seq),
            })
            .collect();
        assert_eq!(kinds, vec![('p', 1), ('f', 2), ('g', 2), ('p', 4)]);
        assert_eq!(seqs_of(w.finish()), vec![3]);
        assert!(w.is_done());
    }

    #[test]
    fn too_few_results_are_failures_and_the_rest_is_remaining() {
        let u = units(vec![keep(1, "a"), keep(2, "b"), keep(3, "b")]);
        let mut w = Waves::new(&u);
        let wave = w.next::<()>(false, |_| None);
        let r = w.apply(&wave.runs, vec![Ok(())]);
        assert!(matches!(r[1], RowResult::Failed(m, _) if m.seq == 2));
        assert_eq!(seqs_of(w.finish()), vec![3]);
        assert!(w.is_done());

        let mut w = Waves::new(&u);
        assert_eq!(seqs_of(w.remaining().collect()), vec![1, 2, 3]);
        let wave = w.next::<()>(false, |_| None);
        w.apply(&wave.runs, vec![Ok(()), Ok(())]);
        w.finish();
        assert_eq!(seqs_of(w.remaining().collect()), vec![3]);
        assert!(Waves::none(&u).is_done());
    }
}
