//! Waiting for a condition: [`eventually`].

use std::{
    fmt,
    time::{Duration, Instant},
};

/// What a condition passed to [`eventually`] may return.
///
/// - `bool`: holds or not (the value is `()`);
/// - `Option<T>`: `Some(value)` holds;
/// - `Result<bool, E>`, `Result<Option<T>, E>`: as above, and `Err` stops the wait at once with that error (the
///   process being waited for has exited, the user pressed Ctrl-C …).
pub trait Check {
    /// What [`eventually`] returns once the condition holds.
    type Value;
    /// `Ok(Some(value))` when it holds, `Ok(None)` when not yet, `Err` to give up now.
    ///
    /// # Errors
    /// The condition's own error.
    fn check(self) -> anyhow::Result<Option<Self::Value>>;
}

impl Check for bool {
    type Value = ();
    fn check(self) -> anyhow::Result<Option<()>> {
        Ok(self.then_some(()))
    }
}

impl<T> Check for Option<T> {
    type Value = T;
    fn check(self) -> anyhow::Result<Option<T>> {
        Ok(self)
    }
}

impl<E: Into<anyhow::Error>> Check for Result<bool, E> {
    type Value = ();
    fn check(self) -> anyhow::Result<Option<()>> {
        self.map(|held| held.then_some(())).map_err(Into::into)
    }
}

impl<T, E: Into<anyhow::Error>> Check for Result<Option<T>, E> {
    type Value = T;
    fn check(self) -> anyhow::Result<Option<T>> {
        self.map_err(Into::into)
    }
}

/// The error of [`eventually`] when the condition did not hold in time; its message names what was awaited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimedOut {
    /// What was awaited, as given to [`eventually`].
    pub what: String,
    /// How long.
    pub timeout: Duration,
}

impl fmt::Display for TimedOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: not within {:?}", self.what, self.timeout)
    }
}

impl std::error::Error for TimedOut {}

/// Calls `condition` every `poll` until it holds, and returns its value; fails with [`TimedOut`] (saying `what`
/// was awaited and for how long) once `timeout` has passed, or at once with the condition's own error.
///
/// The condition is checked at least once, and once more when the timeout is reached (the last sleep is cut
/// short), so a condition that holds just in time counts.
///
/// ```
/// # use std::time::Duration;
/// let mut polls = 0;
/// let n = chaos_test_support::eventually("the third poll", Duration::from_secs(5), Duration::ZERO, || {
///     polls += 1;
///     (polls == 3).then_some(polls)
/// })
/// .unwrap();
/// assert_eq!(n, 3);
/// ```
///
/// # Errors
/// [`TimedOut`], or the condition's error.
pub fn eventually<C: Check>(
    what: impl fmt::Display,
    timeout: Duration,
    poll: Duration,
    mut condition: impl FnMut() -> C,
) -> anyhow::Result<C::Value> {
    let started = Instant::now();
    loop {
        if let Some(value) = condition().check()? {
            return Ok(value);
        }
        let left = timeout.saturating_sub(started.elapsed());
        if left.is_zero() {
            return Err(TimedOut { what: what.to_string(), timeout }.into());
        }
        std::thread::sleep(poll.min(left));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LONG: Duration = Duration::from_secs(600);

    #[test]
    fn returns_the_value_of_the_first_poll_that_holds() {
        let mut polls = 0;
        let got = eventually("a value", LONG, Duration::ZERO, || {
            polls += 1;
            (polls >= 4).then(|| format!("poll {polls}"))
        })
        .unwrap();
        assert_eq!(got, "poll 4");
        assert_eq!(polls, 4);
    }

    #[test]
    fn a_bool_condition_gives_unit() {
        let mut polls = 0;
        eventually("two polls", LONG, Duration::ZERO, || {
            polls += 1;
            polls == 2
        })
        .unwrap();
        assert_eq!(polls, 2);
    }

    #[test]
    fn the_timeout_error_names_what_was_awaited_and_how_long() {
        let mut polls = 0;
        let err = eventually("the agent answers Chaos.status", Duration::ZERO, Duration::ZERO, || {
            polls += 1;
            false
        })
        .unwrap_err();
        assert_eq!(polls, 1, "checked once even with no time at all");
        let timed_out = err.downcast_ref::<TimedOut>().expect("a TimedOut");
        assert_eq!(timed_out.what, "the agent answers Chaos.status");
        assert_eq!(err.to_string(), "the agent answers Chaos.status: not within 0ns");
    }

    #[test]
    fn an_error_of_the_condition_stops_the_wait_at_once() {
        let mut polls = 0;
        let err = eventually("never", LONG, Duration::ZERO, || -> anyhow::Result<bool> {
            polls += 1;
            if polls == 3 { Err(anyhow::anyhow!("the process exited")) } else { Ok(false) }
        })
        .unwrap_err();
        assert_eq!(polls, 3);
        assert_eq!(err.to_string(), "the process exited");
        assert!(err.downcast_ref::<TimedOut>().is_none());
    }

    #[test]
    fn io_errors_pass_through_too() {
        let err = eventually("a file", LONG, Duration::ZERO, || -> std::io::Result<Option<()>> {
            Err(std::io::Error::other("gone"))
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "gone");
    }
}
