//! Time: a millisecond [`Timestamp`] and the [`Clock`] every store and engine reads it from.
//!
//! Stores never read the system clock themselves; they take `now` as an argument, so tests drive
//! lease expiry, backoff and reaping with a clock they control (tokio's paused clock through
//! [`TokioClock`], or a [`ManualClock`]).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch (UTC).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(i64);

impl Timestamp {
    /// The epoch itself; a useful start for test clocks.
    pub const EPOCH: Timestamp = Timestamp(0);

    /// From milliseconds since the epoch.
    pub const fn from_millis(ms: i64) -> Self {
        Timestamp(ms)
    }

    /// Milliseconds since the epoch.
    pub const fn as_millis(self) -> i64 {
        self.0
    }

    /// This instant plus a duration (saturating); the same as `t + d`.
    #[allow(clippy::should_implement_trait)] // it is implemented too; this reads better in chains
    pub fn add(self, d: Duration) -> Self {
        Timestamp(
            self.0
                .saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
        )
    }

    /// This instant minus a duration (saturating); the same as `t - d`.
    #[allow(clippy::should_implement_trait)] // as for `add`
    pub fn sub(self, d: Duration) -> Self {
        Timestamp(
            self.0
                .saturating_sub(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
        )
    }

    /// The time from `earlier` to `self`, zero if `earlier` is later.
    pub fn since(self, earlier: Timestamp) -> Duration {
        Duration::from_millis(u64::try_from(self.0.saturating_sub(earlier.0)).unwrap_or(0))
    }
}

impl std::ops::Add<Duration> for Timestamp {
    type Output = Timestamp;
    fn add(self, d: Duration) -> Timestamp {
        Timestamp::add(self, d)
    }
}

impl std::ops::Sub<Duration> for Timestamp {
    type Output = Timestamp;
    fn sub(self, d: Duration) -> Timestamp {
        Timestamp::sub(self, d)
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Timestamp({}ms)", self.0)
    }
}

/// RFC 3339 in UTC with milliseconds (`2026-11-23T09:12:34.640Z`).
impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.rem_euclid(1000);
        let secs = self.0.div_euclid(1000);
        let (days, sod) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
        // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + i64::from(month <= 2);
        write!(
            f,
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{ms:03}Z",
            sod / 3600,
            (sod / 60) % 60,
            sod % 60
        )
    }
}

/// On the wire a timestamp is a bare integer: milliseconds since the Unix epoch (UTC).
#[cfg(feature = "openapi")]
impl utoipa::PartialSchema for Timestamp {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, SchemaFormat, Type};
        ObjectBuilder::new()
            .schema_type(Type::Integer)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
            .description(Some("Milliseconds since the Unix epoch (UTC)."))
            .examples([serde_json::json!(1_795_425_154_640_i64)])
            .into()
    }
}

#[cfg(feature = "openapi")]
impl utoipa::ToSchema for Timestamp {}

/// Where the engine and stores get "now" from.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// The current time.
    fn now(&self) -> Timestamp;
}

/// The real wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        Timestamp(ms)
    }
}

/// Wall-clock time that advances with tokio's clock: a fixed start plus the elapsed
/// `tokio::time::Instant`. Under `#[tokio::test(start_paused = true)]` it moves exactly as far as
/// the paused clock does, so timestamps in stores and events agree with the engine's timers.
#[derive(Debug, Clone)]
pub struct TokioClock {
    origin_wall: Timestamp,
    origin: tokio::time::Instant,
}

impl TokioClock {
    /// Starts at the current system time.
    pub fn new() -> Self {
        Self::starting_at(SystemClock.now())
    }

    /// Starts at a given wall time (tests use a fixed one for reproducible output).
    pub fn starting_at(start: Timestamp) -> Self {
        TokioClock {
            origin_wall: start,
            origin: tokio::time::Instant::now(),
        }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for TokioClock {
    fn now(&self) -> Timestamp {
        self.origin_wall.add(self.origin.elapsed())
    }
}

/// A clock that moves only when told to; for store tests.
#[derive(Debug, Clone, Default)]
pub struct ManualClock(Arc<AtomicI64>);

impl ManualClock {
    /// A clock that reads `start` until advanced.
    pub fn new(start: Timestamp) -> Self {
        ManualClock(Arc::new(AtomicI64::new(start.as_millis())))
    }

    /// Moves the clock forward.
    pub fn advance(&self, d: Duration) {
        self.0.fetch_add(
            i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
            Ordering::SeqCst,
        );
    }

    /// Sets the clock.
    pub fn set(&self, t: Timestamp) {
        self.0.store(t.as_millis(), Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.0.load(Ordering::SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_saturates_and_since_is_never_negative() {
        let t = Timestamp::from_millis(1_000);
        assert_eq!(t.add(Duration::from_secs(2)).as_millis(), 3_000);
        assert_eq!(t.sub(Duration::from_secs(2)).as_millis(), -1_000);
        assert_eq!(
            t.since(Timestamp::from_millis(400)),
            Duration::from_millis(600)
        );
        assert_eq!(Timestamp::from_millis(400).since(t), Duration::ZERO);
        assert_eq!(
            Timestamp::from_millis(i64::MAX)
                .add(Duration::MAX)
                .as_millis(),
            i64::MAX
        );
    }

    #[test]
    fn displays_as_rfc3339_utc() {
        assert_eq!(Timestamp::EPOCH.to_string(), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            Timestamp::from_millis(951_782_400_123).to_string(),
            "2000-02-29T00:00:00.123Z"
        );
        assert_eq!(
            Timestamp::from_millis(1_795_425_154_640).to_string(),
            "2026-11-23T09:12:34.640Z"
        );
        assert_eq!(
            Timestamp::from_millis(-1).to_string(),
            "1969-12-31T23:59:59.999Z"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn tokio_clock_follows_the_paused_clock() {
        let c = TokioClock::starting_at(Timestamp::from_millis(10_000));
        assert_eq!(c.now().as_millis(), 10_000);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(c.now().as_millis(), 15_000);
    }

    #[test]
    fn manual_clock_moves_only_when_told() {
        let c = ManualClock::new(Timestamp::EPOCH);
        assert_eq!(c.now(), Timestamp::EPOCH);
        c.advance(Duration::from_millis(1500));
        assert_eq!(c.now().as_millis(), 1500);
        c.set(Timestamp::from_millis(7));
        assert_eq!(c.now().as_millis(), 7);
    }
}
