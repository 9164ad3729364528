//! The machine a run was taken on (printed in every table header).

use std::collections::BTreeSet;
use std::fmt;

/// CPU model, core counts and kernel release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Machine {
    /// `model name` from /proc/cpuinfo (or "unknown CPU").
    pub cpu_model: String,
    /// Logical CPUs (`processor` entries in /proc/cpuinfo, or the available parallelism).
    pub logical_cpus: usize,
    /// Physical cores (distinct `physical id`/`core id` pairs) when /proc/cpuinfo says.
    pub physical_cores: Option<usize>,
    /// Kernel release (/proc/sys/kernel/osrelease).
    pub kernel: String,
}

impl Machine {
    /// Reads /proc; missing facts become "unknown".
    pub fn detect() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".to_string());
        let mut machine = Self::from_cpuinfo(&cpuinfo, kernel);
        if machine.logical_cpus == 0 {
            machine.logical_cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
        }
        machine
    }

    /// Builds the description from the text of /proc/cpuinfo.
    pub fn from_cpuinfo(cpuinfo: &str, kernel: String) -> Self {
        let mut model = None;
        let mut logical = 0;
        let mut cores = BTreeSet::new();
        let mut physical_id = None;
        for line in cpuinfo.lines() {
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let (key, value) = (key.trim(), value.trim());
            match key {
                "processor" => logical += 1,
                "model name" | "Model" | "cpu model" if model.is_none() => {
                    model = Some(value.to_string());
                }
                "physical id" => physical_id = Some(value.to_string()),
                "core id" => {
                    cores.insert((physical_id.clone().unwrap_or_default(), value.to_string()));
                }
                _ => {}
            }
        }
        Machine {
            cpu_model: model.unwrap_or_else(|| "unknown CPU".to_string()),
            logical_cpus: logical,
            physical_cores: (!cores.is_empty()).then_some(cores.len()),
            kernel,
        }
    }
}

impl fmt::Display for Machine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}, {} logical CPUs", self.cpu_model, self.logical_cpus)?;
        if let Some(cores) = self.physical_cores {
            write!(f, " ({cores} physical cores)")?;
        }
        write!(f, ", Linux {}", self.kernel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CPUINFO: &str =
        "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Example CPU @ 3.00GHz\n\
physical id\t: 0\ncore id\t\t: 0\n\nprocessor\t: 1\nmodel name\t: Example CPU @ 3.00GHz\n\
physical id\t: 0\ncore id\t\t: 0\n\nprocessor\t: 2\nmodel name\t: Example CPU @ 3.00GHz\n\
physical id\t: 0\ncore id\t\t: 1\n";

    #[test]
    fn parses_model_and_counts() {
        let m = Machine::from_cpuinfo(CPUINFO, "6.1.0".into());
        assert_eq!(m.cpu_model, "Example CPU @ 3.00GHz");
        assert_eq!(m.logical_cpus, 3);
        assert_eq!(m.physical_cores, Some(2));
        assert_eq!(
            m.to_string(),
            "Example CPU @ 3.00GHz, 3 logical CPUs (2 physical cores), Linux 6.1.0"
        );
    }

    #[test]
    fn tolerates_an_empty_cpuinfo() {
        let m = Machine::from_cpuinfo("", "x".into());
        assert_eq!(m.cpu_model, "unknown CPU");
        assert_eq!(m.physical_cores, None);
    }
}
