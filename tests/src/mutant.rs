//! The "deliberately wrong agent" of the VM tier: fault requests made wrong on purpose (the port, the delay, the
//! lifetime), which the tier's verdicts must fail. Used by the guest scenarios (`tests/guest/`) and by the host side
//! (`tests/tests/vm.rs`, `CHAOS_VM_MUTANT`), which requires the rows a kind breaks to have failed.

/// Environment variable naming the mutant the guest scenarios apply to every fault request.
pub const MUTANT_ENV: &str = "CHAOS_VM_MUTANT";

/// How the agent's requests are made wrong.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mutant {
    /// Requests as written.
    #[default]
    None,
    /// The fault goes to the control port instead of the target's.
    WrongPort,
    /// Twice the requested delay.
    DoubleDelay,
    /// A lifetime that does not end within the test.
    NoExpiry,
}

impl Mutant {
    /// The kinds, as written on the command line and in `CHAOS_VM_MUTANT`.
    pub const NAMES: [&'static str; 3] = ["wrong-port", "double-delay", "no-expiry"];

    /// A kind by name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "wrong-port" => Some(Self::WrongPort),
            "double-delay" => Some(Self::DoubleDelay),
            "no-expiry" => Some(Self::NoExpiry),
            _ => None,
        }
    }

    /// `CHAOS_VM_MUTANT`, or none when unset or empty.
    ///
    /// # Panics
    /// When it names no kind (a typo must not run the tier against the right agent).
    pub fn from_env() -> Self {
        match std::env::var(MUTANT_ENV).ok().filter(|m| !m.is_empty()) {
            None => Self::None,
            Some(m) => Self::parse(&m)
                .unwrap_or_else(|| panic!("{MUTANT_ENV}={m}: not a mutant (one of {})", Self::NAMES.join(", "))),
        }
    }

    /// Its name (`none` for [`Mutant::None`]).
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::WrongPort => "wrong-port",
            Self::DoubleDelay => "double-delay",
            Self::NoExpiry => "no-expiry",
        }
    }

    /// The CLI arguments of a fault request, made wrong; `control_port` is where [`Mutant::WrongPort`] sends it.
    pub fn apply(self, args: &[&str], control_port: u16) -> Vec<String> {
        let mut out: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        let shortcut = out.iter().take(2).any(|a| a == "latency");
        for i in 0..out.len() {
            let after = |flag: &str| i > 0 && out[i - 1] == flag;
            match self {
                Self::None => {}
                Self::WrongPort if after("--port") => out[i] = control_port.to_string(),
                Self::DoubleDelay => {
                    if let Some(v) = out[i].strip_prefix("latency=").and_then(|v| v.parse::<f64>().ok()) {
                        out[i] = format!("latency={}", v * 2.0);
                    } else if shortcut && i >= 2 && out[i - 2] == "--port" {
                        // The shortcut `latency --port A SECONDS`.
                        if let Ok(v) = out[i].parse::<f64>() {
                            out[i] = format!("{}", v * 2.0);
                        }
                    }
                }
                Self::NoExpiry if after("--lifetime") => out[i] = "3600".into(),
                _ => {}
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutants_make_requests_wrong_and_only_their_way() {
        let inject = ["lymph-chaos", "inject", "latency", "--port", "5001", "latency=0.01", "--lifetime", "120"];
        assert_eq!(Mutant::None.apply(&inject, 5000), inject);
        assert_eq!(Mutant::WrongPort.apply(&inject, 5000)[4], "5000");
        assert_eq!(Mutant::DoubleDelay.apply(&inject, 5000)[5], "latency=0.02");
        assert_eq!(Mutant::NoExpiry.apply(&inject, 5000)[7], "3600");
        assert_eq!(Mutant::DoubleDelay.apply(&inject, 5000)[7], "120", "the lifetime is no delay");
        let shortcut = ["lymph-chaos", "latency", "--port", "5001", "0.1", "--lifetime", "120"];
        assert_eq!(Mutant::DoubleDelay.apply(&shortcut, 5000)[4], "0.2");
        assert_eq!(Mutant::DoubleDelay.apply(&shortcut, 5000)[3], "5001", "the port is no delay");
        for name in Mutant::NAMES {
            assert_eq!(Mutant::parse(name).map(Mutant::name), Some(name));
        }
    }
}
