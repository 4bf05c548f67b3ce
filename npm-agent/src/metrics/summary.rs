//! Prometheus summaries, as Prometheus's Go client computes them: quantiles over a sliding
//! window (by default 10 minutes in 5 age buckets), a cumulative `_sum` and `_count`.
//!
//! The `prometheus` crate has histograms but no summaries; [`SummaryVec`] is a collector that
//! yields summary metric families, on:
//! - [`Ckms`]: the targeted-quantile estimator of Cormode, Korn, Muthukrishnan and Srivastava
//!   ("Effective computation of biased quantiles over data streams", ICDE 2005), the algorithm
//!   of the Go client's `beorn7/perks/quantile`. For every target (φ, ε) the value reported
//!   for φ has a rank within `(φ ± ε)·n` of the `n` observations it holds; observations are
//!   buffered (500) and merged in sorted batches.
//! - [`Window`]: the Go client's sliding window. Every observation goes into each of
//!   `age_buckets` estimators; the oldest one (the head) answers queries and, every
//!   `max_age / age_buckets`, is reset and the next one becomes the head. The head therefore
//!   holds the observations of the last `max_age - max_age / age_buckets` to `max_age`.
//!   With no observation in the window, quantiles are NaN.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::core::{Collector, Desc};
use prometheus::proto::{LabelPair, Metric, MetricFamily, MetricType, Quantile, Summary};

/// The Go client's defaults (`DefMaxAge`, `DefAgeBuckets`, `DefBufCap`).
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(600);
pub const DEFAULT_AGE_BUCKETS: usize = 5;
pub const BUF_CAP: usize = 500;

/// Azure NPM's objectives: the 0.5 quantile within 0.05, the 0.9 within 0.01, the 0.99
/// within 0.001.
pub const NPM_OBJECTIVES: [(f64, f64); 3] = [(0.5, 0.05), (0.9, 0.01), (0.99, 0.001)];

#[derive(Clone, Copy, Debug, PartialEq)]
struct Sample {
    value: f64,
    /// g: the rank of this sample minus the rank of the previous one (at least).
    width: f64,
    /// Δ: how much higher than its minimum rank this sample's rank may be.
    delta: f64,
}

/// A targeted-quantile estimator (CKMS): bounded memory, each target quantile φ answered
/// with a rank error of at most ε·n.
#[derive(Clone, Debug)]
pub struct Ckms {
    targets: Arc<[(f64, f64)]>,
    /// Observations merged into `samples`.
    n: f64,
    samples: Vec<Sample>,
    /// Observations not merged yet.
    buf: Vec<f64>,
}

impl Ckms {
    /// An estimator for `(quantile, error)` targets, each quantile in (0, 1) and each error
    /// in (0, 1).
    pub fn new(targets: &[(f64, f64)]) -> Self {
        assert!(!targets.is_empty(), "at least one target");
        for &(q, e) in targets {
            assert!(q > 0.0 && q < 1.0 && e > 0.0 && e < 1.0, "invalid target ({q}, {e})");
        }
        Self {
            targets: targets.into(),
            n: 0.0,
            samples: Vec::new(),
            buf: Vec::with_capacity(BUF_CAP),
        }
    }

    pub fn insert(&mut self, v: f64) {
        if v.is_nan() {
            return;
        }
        self.buf.push(v);
        if self.buf.len() >= BUF_CAP {
            self.flush();
        }
    }

    /// Observations held.
    pub fn count(&self) -> u64 {
        self.n as u64 + self.buf.len() as u64
    }

    /// Samples kept (the memory used): far fewer than the observations.
    pub fn samples(&self) -> usize {
        self.samples.len() + self.buf.len()
    }

    pub fn reset(&mut self) {
        self.n = 0.0;
        self.samples.clear();
        self.buf.clear();
    }

    /// How wide (`g + Δ`) a sample spanning the ranks `a..=b` of `n` may be: for every
    /// target (φ, ε), `2εr/φ` at the rank `r` of the span nearest to `φn` when that lies at
    /// or above `φn`, `2ε(n - r)/(1 - φ)` when below (CKMS's targeted invariant), the
    /// smallest over the targets.
    ///
    /// CKMS evaluate the invariant at the sample's first rank only; a wide sample starting
    /// below a target's rank may then straddle it, and the reported quantile misses by up to
    /// `ε/(1 - 2ε/(1 - φ))·n` (1.25·ε for Azure NPM's objectives). Taking the rank of the span
    /// nearest to each target keeps every sample that straddles `φn` within `2εn`, which
    /// gives the bound `εn` exactly; insertions never break it (the allowance at a fixed
    /// position only grows with `n`).
    fn allowed(&self, a: f64, b: f64, n: f64) -> f64 {
        let mut m = f64::MAX;
        for &(q, e) in self.targets.iter() {
            let r = (q * n).clamp(a, b);
            let f = if q * n <= r { 2.0 * e * r / q } else { 2.0 * e * (n - r) / (1.0 - q) };
            m = m.min(f);
        }
        m
    }

    /// Merges the buffered observations (sorted) into the samples, then compresses.
    fn flush(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let mut buf = std::mem::take(&mut self.buf);
        buf.sort_by(f64::total_cmp);
        let old = std::mem::take(&mut self.samples);
        let mut merged = Vec::with_capacity(old.len() + buf.len());
        let mut old = old.into_iter().peekable();
        for v in buf.drain(..) {
            while let Some(s) = old.next_if(|s| s.value <= v) {
                merged.push(s);
            }
            // The new value's rank lies between its predecessor's smallest rank + 1 and its
            // successor's largest rank (a new minimum or maximum is exact).
            let delta = match (merged.is_empty(), old.peek()) {
                (false, Some(next)) => next.width + next.delta - 1.0,
                _ => 0.0,
            };
            merged.push(Sample { value: v, width: 1.0, delta });
            self.n += 1.0;
        }
        merged.extend(old);
        self.samples = merged;
        self.buf = buf;
        self.compress();
    }

    /// Merges every sample into its right neighbour where the invariant allows; the
    /// minimum and the maximum stay exact.
    fn compress(&mut self) {
        if self.samples.len() < 3 {
            return;
        }
        let n = self.n;
        let mut kept: Vec<Sample> = Vec::with_capacity(self.samples.len());
        let last = self.samples.len() - 1;
        kept.push(self.samples[last]);
        // `x` absorbs its left neighbours while it may.
        let mut x = self.samples[last - 1];
        let mut after = self.samples[last].width + x.width;
        for i in (0..last - 1).rev() {
            let c = self.samples[i];
            // The rank before `c`, and the span of `c` and `x` merged.
            let r = n - after - c.width;
            let w = c.width + x.width + x.delta;
            if i > 0 && w <= self.allowed(r, r + w, n) {
                x.width += c.width;
            } else {
                kept.push(x);
                x = c;
            }
            after += c.width;
        }
        kept.push(x);
        kept.reverse();
        self.samples = kept;
    }

    /// The estimate of quantile `q` (NaN without observations).
    pub fn query(&mut self, q: f64) -> f64 {
        if self.samples.is_empty() {
            // Nothing merged yet (fewer than `BUF_CAP` observations): the exact
            // nearest-rank quantile of the buffer, as the Go client answers then.
            if self.buf.is_empty() {
                return f64::NAN;
            }
            self.buf.sort_by(f64::total_cmp);
            let i = ((self.buf.len() as f64 * q).ceil() as usize)
                .saturating_sub(1)
                .min(self.buf.len() - 1);
            return self.buf[i];
        }
        self.flush();
        let n = self.n;
        // The 1-based rank wanted, and the error allowed around it.
        let rank = (q * n).ceil().max(1.0);
        let t = rank + self.allowed(rank, rank, n) / 2.0;
        let mut rmin = 0.0;
        let mut prev = self.samples[0];
        rmin += prev.width;
        for s in &self.samples[1..] {
            // The largest rank `s` may have.
            if rmin + s.width + s.delta > t {
                return prev.value;
            }
            rmin += s.width;
            prev = *s;
        }
        prev.value
    }
}

/// The Go client's sliding window of quantile estimators (see the module documentation).
#[derive(Clone, Debug)]
pub struct Window {
    streams: Vec<Ckms>,
    head: usize,
    head_expires: Instant,
    bucket: Duration,
}

impl Window {
    pub fn new(
        targets: &[(f64, f64)],
        max_age: Duration,
        age_buckets: usize,
        now: Instant,
    ) -> Self {
        let age_buckets = age_buckets.max(1);
        let bucket = max_age / age_buckets as u32;
        Self {
            streams: vec![Ckms::new(targets); age_buckets],
            head: 0,
            head_expires: now + bucket,
            bucket,
        }
    }

    /// Resets the head while it has expired, moving to the next (oldest) estimator.
    fn rotate(&mut self, now: Instant) {
        while now > self.head_expires {
            self.streams[self.head].reset();
            self.head = (self.head + 1) % self.streams.len();
            self.head_expires += self.bucket;
        }
    }

    pub fn observe(&mut self, v: f64, now: Instant) {
        self.rotate(now);
        for s in &mut self.streams {
            s.insert(v);
        }
    }

    /// Observations in the window now.
    pub fn count(&mut self, now: Instant) -> u64 {
        self.rotate(now);
        self.streams[self.head].count()
    }

    pub fn query(&mut self, q: f64, now: Instant) -> f64 {
        self.rotate(now);
        self.streams[self.head].query(q)
    }
}

/// One summary: the window and the cumulative sum and count.
#[derive(Clone, Debug)]
pub struct SummaryState {
    window: Window,
    sum: f64,
    count: u64,
}

impl SummaryState {
    fn new(opts: &SummaryOpts, now: Instant) -> Self {
        Self {
            window: Window::new(&opts.objectives, opts.max_age, opts.age_buckets, now),
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, v: f64, now: Instant) {
        self.window.observe(v, now);
        self.sum += v;
        self.count += 1;
    }
}

/// A summary's name, help, label names and objectives.
#[derive(Clone, Debug)]
pub struct SummaryOpts {
    pub name: String,
    pub help: String,
    pub label_names: Vec<String>,
    pub objectives: Vec<(f64, f64)>,
    pub max_age: Duration,
    pub age_buckets: usize,
}

impl SummaryOpts {
    /// Azure NPM's objectives and the Go client's window.
    pub fn new(name: &str, help: &str, label_names: &[&str]) -> Self {
        Self {
            name: name.into(),
            help: help.into(),
            label_names: label_names.iter().map(|s| s.to_string()).collect(),
            objectives: NPM_OBJECTIVES.to_vec(),
            max_age: DEFAULT_MAX_AGE,
            age_buckets: DEFAULT_AGE_BUCKETS,
        }
    }
}

/// A summary with labels (a summary without labels is a `SummaryVec` with none, exported
/// from the start with NaN quantiles and zero `_sum` and `_count`, as in the Go client). A
/// collector for a `prometheus::Registry`.
pub struct SummaryVec {
    opts: SummaryOpts,
    desc: Desc,
    children: Mutex<BTreeMap<Vec<String>, SummaryState>>,
}

impl std::fmt::Debug for SummaryVec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SummaryVec").field("name", &self.opts.name).finish()
    }
}

impl SummaryVec {
    pub fn new(opts: SummaryOpts) -> prometheus::Result<Self> {
        let desc = Desc::new(
            opts.name.clone(),
            opts.help.clone(),
            opts.label_names.clone(),
            Default::default(),
        )?;
        let mut children = BTreeMap::new();
        if opts.label_names.is_empty() {
            children.insert(Vec::new(), SummaryState::new(&opts, Instant::now()));
        }
        Ok(Self { opts, desc, children: Mutex::new(children) })
    }

    pub fn name(&self) -> &str {
        &self.opts.name
    }

    /// Observes `v` for the label values (in the order of the label names).
    pub fn observe(&self, label_values: &[&str], v: f64) {
        self.observe_at(label_values, v, Instant::now());
    }

    pub fn observe_at(&self, label_values: &[&str], v: f64, now: Instant) {
        assert_eq!(
            label_values.len(),
            self.opts.label_names.len(),
            "{}: label values",
            self.opts.name
        );
        let mut children = self.children.lock().unwrap_or_else(|p| p.into_inner());
        let key: Vec<String> = label_values.iter().map(|s| s.to_string()).collect();
        children.entry(key).or_insert_with(|| SummaryState::new(&self.opts, now)).observe(v, now);
    }

    /// The metric family as of `now`.
    pub fn collect_at(&self, now: Instant) -> MetricFamily {
        let mut children = self.children.lock().unwrap_or_else(|p| p.into_inner());
        let mut metrics = Vec::with_capacity(children.len());
        for (values, state) in children.iter_mut() {
            let mut labels: Vec<LabelPair> = self
                .opts
                .label_names
                .iter()
                .zip(values)
                .map(|(n, v)| {
                    let mut l = LabelPair::default();
                    l.set_name(n.clone());
                    l.set_value(v.clone());
                    l
                })
                .collect();
            labels.sort_by(|a, b| a.name().cmp(b.name()));
            let mut objectives: Vec<f64> = self.opts.objectives.iter().map(|(q, _)| *q).collect();
            objectives.sort_by(f64::total_cmp);
            let quantiles = objectives
                .into_iter()
                .map(|q| {
                    let mut qq = Quantile::default();
                    qq.set_quantile(q);
                    qq.set_value(state.window.query(q, now));
                    qq
                })
                .collect();
            let mut s = Summary::default();
            s.set_sample_count(state.count);
            s.set_sample_sum(state.sum);
            s.set_quantile(quantiles);
            let mut m = Metric::from_label(labels);
            m.set_summary(s);
            metrics.push(m);
        }
        let mut mf = MetricFamily::default();
        mf.set_name(self.opts.name.clone());
        mf.set_help(self.opts.help.clone());
        mf.set_field_type(MetricType::SUMMARY);
        mf.set_metric(metrics);
        mf
    }
}

impl Collector for SummaryVec {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        vec![self.collect_at(Instant::now())]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator (xorshift64*), uniform in [0, 1).
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> f64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    /// Checks every objective of `est` against the exact ranks of `data`.
    fn check(est: &mut Ckms, data: &[f64], what: &str) {
        let mut sorted = data.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len() as f64;
        for &(q, e) in NPM_OBJECTIVES.iter() {
            let v = est.query(q);
            // The ranks `v` has in the data: [below + 1, below_or_equal].
            let below = sorted.partition_point(|x| *x < v) as f64;
            let upto = sorted.partition_point(|x| *x <= v) as f64;
            assert!(upto > below, "{what}: q{q} = {v} is not an observation");
            let (lo, hi) = ((q - e) * n, (q + e) * n);
            assert!(
                upto >= lo.floor() && below + 1.0 <= hi.ceil(),
                "{what}: q{q} = {v} has ranks {}..={upto} of {n}, outside [{lo}, {hi}]",
                below + 1.0
            );
        }
    }

    #[test]
    fn few_observations_are_exact() {
        for n in (1..=60usize).chain([499]) {
            let mut est = Ckms::new(&NPM_OBJECTIVES);
            let data: Vec<f64> = (0..n).map(|i| ((i * 7919) % n) as f64).collect();
            for v in &data {
                est.insert(*v);
            }
            for (q, _) in NPM_OBJECTIVES {
                // The nearest-rank quantile: the ceil(q·n)-th smallest, i.e. the value
                // ceil(q·n) - 1 of 0..n.
                let want = ((q * n as f64).ceil() - 1.0).max(0.0);
                assert_eq!(est.query(q), want, "n={n} q={q}");
            }
        }
    }

    #[test]
    fn small_merged_streams_within_error() {
        // Past one buffer the estimator merges; the bounds hold from there on.
        for n in [500usize, 501, 777, 1500, 2999] {
            let mut rng = Rng(n as u64);
            let data: Vec<f64> = (0..n).map(|_| rng.next()).collect();
            let mut est = Ckms::new(&NPM_OBJECTIVES);
            for v in &data {
                est.insert(*v);
            }
            check(&mut est, &data, &format!("uniform n={n}"));
        }
    }

    #[test]
    fn uniform_within_error() {
        for (seed, n) in [(1u64, 1_000usize), (2, 10_000), (3, 200_000)] {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let data: Vec<f64> = (0..n).map(|_| rng.next() * 100.0).collect();
            let mut est = Ckms::new(&NPM_OBJECTIVES);
            for v in &data {
                est.insert(*v);
            }
            check(&mut est, &data, &format!("uniform n={n}"));
            if n >= 100_000 {
                // Bounded memory: a few hundred samples, not the observations.
                assert!(est.samples() < 2_000, "kept {} samples of {n}", est.samples());
            }
        }
    }

    #[test]
    fn exponential_within_error() {
        for (seed, n) in [(11u64, 5_000usize), (12, 100_000)] {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            // Exponential with mean 5 (ms, say): -ln(U)·5.
            let data: Vec<f64> = (0..n).map(|_| -(1.0 - rng.next()).ln() * 5.0).collect();
            let mut est = Ckms::new(&NPM_OBJECTIVES);
            for v in &data {
                est.insert(*v);
            }
            check(&mut est, &data, &format!("exponential n={n}"));
        }
    }

    #[test]
    fn many_streams_within_error() {
        // Uniform, exponential, bimodal and slowly drifting streams, in many sizes.
        for seed in 1..=24u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
            let n = [600usize, 2_500, 12_000][seed as usize % 3];
            let data: Vec<f64> = (0..n)
                .map(|i| match seed % 4 {
                    0 => rng.next(),
                    1 => -(1.0 - rng.next()).ln(),
                    2 => {
                        if rng.next() < 0.8 {
                            rng.next()
                        } else {
                            100.0 + rng.next()
                        }
                    }
                    _ => i as f64 / n as f64 + rng.next() * 0.1,
                })
                .collect();
            let mut est = Ckms::new(&NPM_OBJECTIVES);
            for v in &data {
                est.insert(*v);
            }
            check(&mut est, &data, &format!("stream {seed} (kind {}) n={n}", seed % 4));
        }
    }

    #[test]
    fn sorted_and_reversed_input_within_error() {
        let n = 50_000;
        let up: Vec<f64> = (0..n).map(|i| i as f64).collect();
        let down: Vec<f64> = up.iter().rev().copied().collect();
        for (data, what) in [(&up, "ascending"), (&down, "descending")] {
            let mut est = Ckms::new(&NPM_OBJECTIVES);
            for v in data.iter() {
                est.insert(*v);
            }
            check(&mut est, data, what);
        }
    }

    #[test]
    fn many_equal_values() {
        let mut rng = Rng(77);
        let data: Vec<f64> = (0..20_000).map(|_| (rng.next() * 4.0).floor()).collect();
        let mut est = Ckms::new(&NPM_OBJECTIVES);
        for v in &data {
            est.insert(*v);
        }
        check(&mut est, &data, "four distinct values");
    }

    #[test]
    fn empty_is_nan() {
        let mut est = Ckms::new(&NPM_OBJECTIVES);
        assert!(est.query(0.5).is_nan());
        est.insert(f64::NAN);
        assert!(est.query(0.5).is_nan());
    }

    #[test]
    fn window_forgets_after_max_age() {
        let t0 = Instant::now();
        let min = Duration::from_secs(60);
        let mut w = Window::new(&NPM_OBJECTIVES, DEFAULT_MAX_AGE, DEFAULT_AGE_BUCKETS, t0);
        for i in 0..100 {
            w.observe(1000.0 + i as f64, t0);
        }
        // Minute 3: a second group of smaller values.
        for i in 0..100 {
            w.observe(i as f64, t0 + 3 * min);
        }
        assert_eq!(w.count(t0 + 3 * min), 200);
        assert_eq!(w.query(0.99, t0 + 9 * min), 1097.0);
        // Past 10 minutes the first group is gone (the head covered [0, 2) minutes).
        assert_eq!(w.count(t0 + 10 * min + Duration::from_secs(1)), 100);
        assert_eq!(w.query(0.99, t0 + 10 * min + Duration::from_secs(1)), 98.0);
        // The second group (minute 3) went into the estimator that covers [2, 12) minutes.
        assert_eq!(w.count(t0 + 12 * min - Duration::from_secs(1)), 100);
        assert!(w.query(0.5, t0 + 12 * min + Duration::from_secs(1)).is_nan());
        assert_eq!(w.count(t0 + 12 * min + Duration::from_secs(1)), 0);
        // Long idle periods rotate through every bucket.
        w.observe(5.0, t0 + 100 * min);
        assert_eq!(w.query(0.5, t0 + 100 * min), 5.0);
    }

    #[test]
    fn summary_vec_families() {
        let t0 = Instant::now();
        let v =
            SummaryVec::new(SummaryOpts::new("x_exec_time", "help", &["operation", "had_error"]))
                .unwrap();
        assert!(
            v.collect_at(t0).get_metric().is_empty(),
            "a vec has no series before an observation"
        );
        v.observe_at(&["create", "false"], 2.0, t0);
        v.observe_at(&["create", "false"], 4.0, t0);
        v.observe_at(&["delete", "true"], 8.0, t0);
        let mf = v.collect_at(t0);
        assert_eq!(mf.get_field_type(), MetricType::SUMMARY);
        assert_eq!(mf.get_metric().len(), 2);
        let m = &mf.get_metric()[0];
        let labels: Vec<(&str, &str)> =
            m.get_label().iter().map(|l| (l.name(), l.value())).collect();
        assert_eq!(labels, [("had_error", "false"), ("operation", "create")]);
        let s = m.get_summary();
        assert_eq!((s.sample_count(), s.sample_sum()), (2, 6.0));
        let qs: Vec<(f64, f64)> =
            s.get_quantile().iter().map(|q| (q.quantile(), q.value())).collect();
        assert_eq!(qs, [(0.5, 2.0), (0.9, 4.0), (0.99, 4.0)]);
        // After the window the quantiles are NaN; sum and count stay.
        let later = v.collect_at(t0 + Duration::from_secs(601));
        let s = later.get_metric()[0].get_summary();
        assert_eq!(s.sample_count(), 2);
        assert!(s.get_quantile().iter().all(|q| q.value().is_nan()));

        let plain = SummaryVec::new(SummaryOpts::new("y_exec_time", "help", &[])).unwrap();
        let mf = plain.collect_at(t0);
        assert_eq!(mf.get_metric().len(), 1, "a summary without labels is exported from the start");
        assert_eq!(mf.get_metric()[0].get_summary().sample_count(), 0);
    }
}
