//! The soak run: the real `comfyfleet serve` binary (SQLite) under steady load with faults for
//! N minutes, sampled over time — throughput, latency (submit → terminal event over
//! `/v1/events`), the service's RSS and open file descriptors. Flat is the goal: RSS and
//! descriptors may grow at most 5 % after the warm-up (the first fifth of the run).
//!
//! Run: `cargo xtask soak --minutes N` (builds the release binaries first). Writes the plot
//! `soak.png` and the "Soak" section of `BENCHMARKS.md` (the load harness's table above it is
//! kept). Options: `--minutes N` (default 10, fractions allowed), `--rate R` jobs/s submitted
//! (default 40), `--dir D` where `BENCHMARKS.md` and `soak.png` go (default `.`).
//!
//! The fleet: two healthy simulators (one with prefetch), one that hangs prompts after
//! accepting them now and then (start timeout 2 s fails them over), one that crashes and
//! restarts (losing its queue), one whose WebSocket is silent, one that answers 15 % of
//! requests with 503. Each job does 5–50 ms of simulated work.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use comfyfleet_benches::{Service, comfyui_backend, machine, met, ms, open_fds, pct, rss_mib, wf};
use comfyfleet_testkit::comfyui_sim::{ComfyUiSim, HttpErrors, SimConfig, Trigger};
use plotters::prelude::*;
use tokio::sync::{Semaphore, mpsc};

/// One sample of the run.
#[derive(Debug, Clone)]
struct Sample {
    /// Minutes since the start.
    at_min: f64,
    /// Terminal events per second over the interval.
    jobs_per_s: f64,
    /// Submit → terminal event, p50 / p99 over the jobs that ended in the interval (ms).
    p50_ms: f64,
    p99_ms: f64,
    /// Jobs that ended failed or cancelled in the interval.
    not_succeeded: usize,
    rss_mib: f64,
    fds: usize,
}

struct Args {
    minutes: f64,
    rate: f64,
    dir: PathBuf,
}

fn args() -> Args {
    let all: Vec<String> = std::env::args().collect();
    let value = |name: &str| {
        all.iter().position(|a| a == name).map(|i| {
            all.get(i + 1)
                .cloned()
                .unwrap_or_else(|| panic!("{name} needs a value"))
        })
    };
    let number = |name: &str, default: f64| {
        value(name).map_or(default, |v| {
            v.parse::<f64>()
                .ok()
                .filter(|n| *n > 0.0)
                .unwrap_or_else(|| panic!("{name} must be a positive number, not {v:?}"))
        })
    };
    Args {
        minutes: number("--minutes", 10.0),
        rate: number("--rate", 40.0),
        dir: value("--dir").map_or_else(|| PathBuf::from("."), PathBuf::from),
    }
}

/// The faulty fleet (see the module docs).
struct Fleet {
    sims: Vec<(&'static str, ComfyUiSim)>,
}

impl Fleet {
    async fn start() -> Fleet {
        let scaled = || SimConfig::scaled(0.01);
        let mut sims = Vec::new();
        for role in ["healthy-1", "healthy-2", "hangs"] {
            sims.push((role, ComfyUiSim::start(scaled()).await.unwrap()));
        }
        sims.push((
            "crashes",
            ComfyUiSim::start(scaled().restart_delay(Duration::from_secs(2)))
                .await
                .unwrap(),
        ));
        let silent = ComfyUiSim::start(scaled()).await.unwrap();
        silent.faults().set_silent_websocket(true);
        sims.push(("silent-ws", silent));
        let flaky = ComfyUiSim::start(scaled()).await.unwrap();
        flaky.faults().set_http_errors(Some(HttpErrors {
            status: 503,
            trigger: Trigger::Probability(0.15),
            path_contains: None,
        }));
        sims.push(("5xx", flaky));
        Fleet { sims }
    }

    fn get(&self, role: &str) -> &ComfyUiSim {
        &self.sims.iter().find(|(r, _)| *r == role).unwrap().1
    }

    fn backends(&self) -> String {
        let mut toml = String::new();
        for (role, sim) in &self.sims {
            let extra = if *role == "healthy-2" {
                "prefetch = 1"
            } else {
                ""
            };
            toml.push_str(&comfyui_backend(&format!("sim-{role}"), sim, extra));
        }
        toml
    }
}

/// Turns the hanging simulator's fault on and off and crashes the crashing one now and then,
/// until stopped. Returns the number of crashes.
fn fault_driver(fleet: Arc<Fleet>, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut rng = fastrand::Rng::with_seed(7);
        let mut crashes = 0;
        while !stop.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(rng.u64(300..1500))).await;
            fleet
                .get("hangs")
                .faults()
                .set_hang_after_accept(rng.f64() < 0.3);
            if rng.f64() < 0.05 {
                fleet.get("crashes").restart().await;
                crashes += 1;
            }
        }
        fleet.get("hangs").faults().set_hang_after_accept(false);
        crashes
    })
}

/// Matches submits with terminal events.
#[derive(Default)]
struct Tracker {
    /// Submitted, not ended yet: job → when its submit request started.
    pending: HashMap<String, Instant>,
    /// Ended before its submit's response was seen here: job → (when, terminal type).
    early: HashMap<String, (Instant, String)>,
    succeeded: usize,
    not_succeeded: usize,
}

impl Tracker {
    /// Takes in new submits and terminal events; returns the latencies (ms, sorted) of the jobs
    /// that ended since the last call and how many of them did not succeed.
    fn collect(
        &mut self,
        svc: &Service,
        sent: &mut mpsc::UnboundedReceiver<(String, Instant)>,
    ) -> (Vec<f64>, usize) {
        while let Ok((id, t0)) = sent.try_recv() {
            self.pending.insert(id, t0);
        }
        let ended: Vec<(String, (Instant, serde_json::Value))> =
            svc.ended.lock().unwrap().drain().collect();
        for (id, (at, ev)) in ended {
            let ty = ev["type"].as_str().unwrap_or("").to_owned();
            self.early.insert(id, (at, ty));
        }
        let (mut lat, mut bad) = (Vec::new(), 0);
        let Tracker {
            pending,
            early,
            succeeded,
            not_succeeded,
        } = self;
        early.retain(|id, (at, ty)| match pending.remove(id) {
            Some(t0) => {
                lat.push(ms(at.saturating_duration_since(t0)));
                if ty == "succeeded" {
                    *succeeded += 1;
                } else {
                    *not_succeeded += 1;
                    bad += 1;
                }
                false
            }
            None => true,
        });
        lat.sort_by(f64::total_cmp);
        (lat, bad)
    }
}

/// Relative growth of `series` from just after the warm-up (the first fifth) to the end, each
/// side the mean of three samples.
fn growth(series: &[f64]) -> f64 {
    let warm = (series.len() / 5).max(1);
    let after = &series[warm.min(series.len().saturating_sub(1))..];
    let k = after.len().clamp(1, 3);
    let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
    let start = mean(&after[..k]);
    let end = mean(&after[after.len() - k..]);
    (end - start) / start.max(f64::MIN_POSITIVE)
}

/// One panel of the plot: its caption and its lines (name, colour, points).
type Panel<'a> = (&'a str, Vec<(&'a str, RGBColor, Vec<(f64, f64)>)>);

fn plot(path: &Path, samples: &[Sample], title: &str) -> Result<(), Box<dyn std::error::Error>> {
    let root = BitMapBackend::new(path, (1200, 1300)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, body) = root.split_vertically(50);
    top.draw(&Text::new(
        title.to_owned(),
        (20, 15),
        ("sans-serif", 22).into_font(),
    ))?;
    let panels = body.split_evenly((4, 1));
    let end = samples.last().map_or(1.0, |s| s.at_min).max(0.1);
    let series = |f: &dyn Fn(&Sample) -> f64| -> Vec<(f64, f64)> {
        samples.iter().map(|s| (s.at_min, f(s))).collect()
    };
    let max_of = |pts: &[(f64, f64)]| {
        pts.iter()
            .map(|p| p.1)
            .filter(|v| v.is_finite())
            .fold(0.0, f64::max)
            * 1.15
            + 1e-9
    };
    let lines: [Panel<'_>; 4] = [
        (
            "throughput (terminal events per second)",
            vec![("jobs/s", BLUE, series(&|s| s.jobs_per_s))],
        ),
        (
            "latency, submit → terminal event (ms)",
            vec![
                ("p50", GREEN, series(&|s| s.p50_ms)),
                ("p99", RED, series(&|s| s.p99_ms)),
            ],
        ),
        (
            "service RSS (MiB)",
            vec![("VmRSS", MAGENTA, series(&|s| s.rss_mib))],
        ),
        (
            "service open file descriptors",
            vec![("fds", BLACK, series(&|s| s.fds as f64))],
        ),
    ];
    for (area, (caption, data)) in panels.iter().zip(lines) {
        let top_y = data
            .iter()
            .map(|(_, _, pts)| max_of(pts))
            .fold(0.0, f64::max);
        let mut chart = ChartBuilder::on(area)
            .caption(caption, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..end, 0.0..top_y)?;
        chart
            .configure_mesh()
            .x_desc("minutes")
            .label_style(("sans-serif", 13))
            .draw()?;
        for (name, color, pts) in data {
            chart
                .draw_series(LineSeries::new(pts, color.stroke_width(2)))?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 13))
            .draw()?;
    }
    root.present()?;
    Ok(())
}

/// A system font for the plot's text (`fonts-dejavu-core`; `cargo xtask soak` installs it).
fn register_font() {
    const FONTS: &[&str] = &[
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/TTF/DejaVuSans.ttf",
        "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    ];
    let bytes = FONTS
        .iter()
        .find_map(|p| std::fs::read(p).ok())
        .unwrap_or_else(|| {
            panic!(
                "no DejaVuSans.ttf in {FONTS:?}: install fonts-dejavu-core (cargo xtask soak does)"
            )
        });
    // Leaked once: plotters keeps registered fonts for the life of the process.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_err() {
        panic!("DejaVuSans.ttf is not a font plotters can read");
    }
}

/// Replaces the soak section of `BENCHMARKS.md` (from `<!-- soak -->` to the end), keeping the
/// load harness's part above it.
fn write_section(path: &Path, section: &str) {
    let existing = std::fs::read_to_string(path).unwrap_or_default();
    let head = existing
        .split(comfyfleet_benches::SOAK_MARKER)
        .next()
        .unwrap_or("")
        .trim_end();
    let text = if head.is_empty() {
        format!("# comfyfleet benchmarks\n\n{section}")
    } else {
        format!("{head}\n\n{section}")
    };
    std::fs::write(path, text).unwrap();
}

fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = args();
    register_font();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(args));
}

async fn run(args: Args) {
    let total = Duration::from_secs_f64(args.minutes * 60.0);
    // About 60 samples, between 2 s and 30 s apart.
    let every = Duration::from_secs_f64((total.as_secs_f64() / 60.0).clamp(2.0, 30.0));
    let fleet = Arc::new(Fleet::start().await);
    let svc = Arc::new(
        Service::start(
            &fleet.backends(),
            "start_timeout_secs = 2.0\nnode_timeout_secs = 5.0\ncancel_grace_secs = 2.0",
        )
        .await,
    );
    let pid = svc.children[0].id();
    let stop = Arc::new(AtomicBool::new(false));
    let faults = fault_driver(fleet.clone(), stop.clone());

    // The submitter: `rate` jobs per second, at most 256 submits in flight.
    let (sent_tx, mut sent_rx) = mpsc::unbounded_channel::<(String, Instant)>();
    let submitter = {
        let (svc, stop) = (svc.clone(), stop.clone());
        let rate = args.rate;
        tokio::spawn(async move {
            let permits = Arc::new(Semaphore::new(256));
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut rng = fastrand::Rng::with_seed(11);
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                tick.tick().await;
                let permit = permits.clone().acquire_owned().await.unwrap();
                let (svc, tx) = (svc.clone(), sent_tx.clone());
                // 0.5–5 simulated seconds = 5–50 ms of work; a unique prefix per job.
                let work = wf(rng.f64() * 4.5 + 0.5, &format!("soak_{n}"));
                n += 1;
                tokio::spawn(async move {
                    let t0 = Instant::now();
                    let id = svc.submit(work).await;
                    let _ = tx.send((id, t0));
                    drop(permit);
                });
            }
            n
        })
    };

    let started = Instant::now();
    let mut samples = Vec::new();
    let mut tracker = Tracker::default();
    println!("minute  jobs/s  p50 ms  p99 ms  failed  RSS MiB  fds");
    while started.elapsed() < total {
        let tick = Instant::now();
        tokio::time::sleep(every).await;
        let (lat, bad) = tracker.collect(&svc, &mut sent_rx);
        let (rss, _) = rss_mib(pid);
        let s = Sample {
            at_min: started.elapsed().as_secs_f64() / 60.0,
            jobs_per_s: lat.len() as f64 / tick.elapsed().as_secs_f64(),
            p50_ms: pct(&lat, 0.5),
            p99_ms: pct(&lat, 0.99),
            not_succeeded: bad,
            rss_mib: rss,
            fds: open_fds(pid),
        };
        println!(
            "{:6.2}  {:6.1}  {:6.1}  {:6.1}  {:6}  {:7.1}  {:3}",
            s.at_min, s.jobs_per_s, s.p50_ms, s.p99_ms, s.not_succeeded, s.rss_mib, s.fds
        );
        samples.push(s);
    }
    stop.store(true, Ordering::SeqCst);
    let submitted = submitter.await.unwrap() as usize;
    let crashes = faults.await.unwrap();
    // Drain: every submitted job must end.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        tracker.collect(&svc, &mut sent_rx);
        if (tracker.pending.is_empty() && tracker.succeeded + tracker.not_succeeded >= submitted)
            || Instant::now() > deadline
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (succeeded, not_succeeded) = (tracker.succeeded, tracker.not_succeeded);
    let lost = submitted - (succeeded + not_succeeded).min(submitted);
    let peak = rss_mib(pid).1;
    if let Ok(svc) = Arc::try_unwrap(svc) {
        svc.stop();
    }

    let rss: Vec<f64> = samples.iter().map(|s| s.rss_mib).collect();
    let fds: Vec<f64> = samples.iter().map(|s| s.fds as f64).collect();
    let (g_rss, g_fds) = (growth(&rss), growth(&fds));
    let tp: Vec<f64> = samples.iter().map(|s| s.jobs_per_s).collect();
    let mut p99s: Vec<f64> = samples
        .iter()
        .map(|s| s.p99_ms)
        .filter(|v| v.is_finite())
        .collect();
    p99s.sort_by(f64::total_cmp);
    let title = format!(
        "comfyfleet soak: {:.0} min, {} jobs/s submitted, faulty fleet of 6 simulators, SQLite",
        args.minutes, args.rate
    );
    let png = args.dir.join("soak.png");
    plot(&png, &samples, &title).unwrap_or_else(|e| panic!("plotting {}: {e}", png.display()));

    let mut md = String::new();
    md.push_str(comfyfleet_benches::SOAK_MARKER);
    md.push_str("\n## Soak\n\n");
    md.push_str(&format!(
        "`cargo xtask soak --minutes {}` on {}: the real `serve` binary on SQLite, {} jobs/s \
         submitted over its API for {:.1} minutes to six simulators — two healthy (one with \
         prefetch), one hanging prompts after accepting them now and then (start timeout 2 s), \
         one crashing and restarting ({crashes} crashes), one with a silent WebSocket, one \
         answering 15 % of requests with 503. Sampled every {:.0} s; warm-up = the first fifth.\n\n",
        args.minutes,
        machine(),
        args.rate,
        args.minutes,
        every.as_secs_f64()
    ));
    md.push_str("| figure | value | target | |\n|---|---:|---|---|\n");
    md.push_str(&format!(
        "| jobs submitted / succeeded / failed or cancelled / lost | {submitted} / {succeeded} / {not_succeeded} / {lost} | 0 lost | {} |\n",
        met(lost == 0)
    ));
    md.push_str(&format!(
        "| throughput per sample, min / median / max | {:.1} / {:.1} / {:.1} jobs/s | — | |\n",
        tp.iter().copied().fold(f64::INFINITY, f64::min),
        {
            let mut t = tp.clone();
            t.sort_by(f64::total_cmp);
            pct(&t, 0.5)
        },
        tp.iter().copied().fold(0.0, f64::max)
    ));
    md.push_str(&format!(
        "| latency p99 per sample (submit → terminal event), median / worst | {:.0} / {:.0} ms | — | |\n",
        pct(&p99s, 0.5),
        pct(&p99s, 1.0)
    ));
    md.push_str(&format!(
        "| service RSS growth after warm-up (start → end; peak {peak:.1} MiB) | {:+.1} % ({:.1} → {:.1} MiB) | ≤ 5 % | {} |\n",
        g_rss * 100.0,
        rss.get((rss.len() / 5).max(1).min(rss.len().saturating_sub(1))).copied().unwrap_or(f64::NAN),
        rss.last().copied().unwrap_or(f64::NAN),
        met(g_rss <= 0.05)
    ));
    md.push_str(&format!(
        "| open file descriptors growth after warm-up | {:+.1} % ({:.0} → {:.0}) | ≤ 5 % | {} |\n",
        g_fds * 100.0,
        fds.get((fds.len() / 5).max(1).min(fds.len().saturating_sub(1)))
            .copied()
            .unwrap_or(f64::NAN),
        fds.last().copied().unwrap_or(f64::NAN),
        met(g_fds <= 0.05)
    ));
    md.push_str(
        "\n![throughput, latency, RSS and descriptors over the soak run](soak.png)\n\n\
         Growth compares the mean of the three samples right after the warm-up with the mean of \
         the last three. Failed jobs are the faults' doing (a prompt lost in a crash whose \
         retries ran out, a start timeout on every try); each one's attempts say why.\n",
    );
    let bench = args.dir.join("BENCHMARKS.md");
    write_section(&bench, &md);
    println!("\n{md}");
    println!("wrote {} and {}", bench.display(), png.display());
}
