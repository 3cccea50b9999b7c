//! Seeded selection: which of the resolved candidates a fault hits.

use rand::{SeedableRng, rngs::StdRng, seq::SliceRandom};

use super::{FaultError, resolve::Candidate};
use crate::faults::Selection;

/// Chooses targets: sorted deterministically, then shuffled with the seed, so a seed replays the same choice.
pub(super) fn select(
    mut candidates: Vec<Candidate>,
    selection: Selection,
    seed: u64,
) -> Result<Vec<Candidate>, FaultError> {
    if candidates.is_empty() {
        return Ok(candidates);
    }
    candidates.sort_by_key(|c| {
        (c.instance.as_ref().map(|i| i.id.clone()), c.process.as_ref().map(|p| p.pid), c.ports.clone())
    });
    let n = candidates.len();
    let k = match selection {
        Selection::One => 1,
        Selection::Count(0) => return Err(FaultError::Invalid("count must be at least 1".into())),
        Selection::Count(c) => (c as usize).min(n),
        Selection::Percent(p) if !(p > 0.0 && p <= 100.0) => {
            return Err(FaultError::Invalid(format!("percent must be in (0, 100], got {p}")));
        }
        Selection::Percent(p) => ((n as f64 * p / 100.0).ceil() as usize).clamp(1, n),
        Selection::All => n,
    };
    let mut rng = StdRng::seed_from_u64(seed);
    candidates.shuffle(&mut rng);
    candidates.truncate(k);
    // Keep a stable order in reports.
    candidates.sort_by_key(|c| c.process.as_ref().map(|p| p.pid));
    Ok(candidates)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::faults::process::{Origin, ProcInfo};

    fn cand(pid: i32) -> Candidate {
        Candidate {
            process: Some(ProcInfo {
                pid,
                ppid: 1,
                comm: "x".into(),
                cmdline: "x".into(),
                start_time: 1,
                kthread: false,
                state: 'S',
            }),
            ports: vec![],
            instance: None,
            origin: Origin::Direct,
        }
    }

    #[test]
    fn selection_is_seeded_and_bounded() {
        let all: Vec<Candidate> = (10..20).map(cand).collect();
        let pick = |sel, seed| {
            select(all.clone(), sel, seed).unwrap().iter().map(|c| c.process.as_ref().unwrap().pid).collect::<Vec<_>>()
        };
        assert_eq!(pick(Selection::One, 7), pick(Selection::One, 7));
        assert_eq!(pick(Selection::One, 7).len(), 1);
        assert_eq!(pick(Selection::Count(3), 1).len(), 3);
        assert_eq!(pick(Selection::Count(99), 1).len(), 10);
        assert_eq!(pick(Selection::Percent(25.0), 1).len(), 3);
        assert_eq!(pick(Selection::All, 1).len(), 10);
        // Different seeds explore different choices.
        let distinct: BTreeSet<Vec<i32>> = (0..20).map(|s| pick(Selection::One, s)).collect();
        assert!(distinct.len() > 3);
        assert!(select(all.clone(), Selection::Count(0), 1).is_err());
        assert!(select(all, Selection::Percent(0.0), 1).is_err());
    }
}
