//! The Redis side of the shared limits: one script call decides and leases blocks for every
//! counter in one round trip.

use super::{position, slot, Limits, Observed, Subject, COUNTERS};

/// What one call of [`REDIS_SCRIPT`] answered.
#[derive(Debug, Clone, PartialEq)]
pub struct Grant {
    pub allowed: bool,
    /// Counts before this call.
    pub observed: [Observed; COUNTERS],
    /// Requests leased per counter (all zero when refused).
    pub granted: [u64; COUNTERS],
}

/// The Redis script: for every counter a block is asked for, reads its (current, previous)
/// pair and decides with the same rule as [`decide`]; only when each has room for one more
/// request does it lease each a block: the asked size, at most an eighth of the room left, at
/// least one. Counters asked for 0 are covered by a lease the replica holds.
/// KEYS: 12 keys, (current, previous) per counter. ARGV: 6 limits, 6 weights of the previous
/// window (0 for the day window), 6 TTLs in ms, 6 block sizes asked for.
/// Reply: allowed, the 12 counts before the call, the 6 blocks granted.
pub const REDIS_SCRIPT: &str = r#"
local vals = redis.call('MGET', unpack(KEYS))
local allowed = 1
local grants = {}
for i = 1, 6 do
  local want = tonumber(ARGV[18+i])
  grants[i] = 0
  if want > 0 then
    local cur = tonumber(vals[2*i-1]) or 0
    local prev = tonumber(vals[2*i]) or 0
    local room = math.floor(tonumber(ARGV[i]) - (prev * tonumber(ARGV[6+i]) + cur))
    if room < 1 then allowed = 0 end
    grants[i] = math.max(1, math.min(want, math.floor(room / 8)))
  end
end
if allowed == 1 then
  for i = 1, 6 do
    if grants[i] > 0 then
      redis.call('INCRBY', KEYS[2*i-1], grants[i])
      redis.call('PEXPIRE', KEYS[2*i-1], ARGV[12+i])
    end
  end
end
local out = {allowed}
for i = 1, 12 do out[i+1] = tonumber(vals[i]) or 0 end
for i = 1, 6 do out[13+i] = allowed * grants[i] end
return out
"#;

/// Builds the script's KEYS and ARGV for one request.
pub fn redis_call(
    key_id: &str,
    org_id: &str,
    limits: Limits,
    now_ms: u64,
    wants: &[u64; COUNTERS],
) -> (Vec<String>, Vec<String>) {
    let mut keys = Vec::with_capacity(12);
    let mut weights = Vec::with_capacity(6);
    let mut ttls = Vec::with_capacity(6);
    for i in 0..COUNTERS {
        let (subject, window) = slot(i);
        let id = if subject == Subject::Key {
            key_id
        } else {
            org_id
        };
        let (index, elapsed) = position(window, now_ms);
        let base = format!("apitree:rl:{}:{}:{}", subject.label(), id, window.label());
        keys.push(format!("{base}:{index}"));
        keys.push(format!("{base}:{}", index.saturating_sub(1)));
        let w = if window.sliding() {
            1.0 - elapsed as f64 / window.length_ms() as f64
        } else {
            0.0
        };
        weights.push(format!("{w:.6}"));
        ttls.push((2 * window.length_ms()).to_string());
    }
    let mut argv: Vec<String> = limits.0.iter().map(u64::to_string).collect();
    argv.extend(weights);
    argv.extend(ttls);
    argv.extend(wants.iter().map(u64::to_string));
    (keys, argv)
}

/// Reads the script's reply; `None` when it has the wrong shape.
pub fn redis_grant(reply: &[i64]) -> Option<Grant> {
    if reply.len() != 1 + 2 * COUNTERS + COUNTERS {
        return None;
    }
    let count = |v: i64| v.max(0) as u64;
    let mut observed = [Observed::default(); COUNTERS];
    for (i, o) in observed.iter_mut().enumerate() {
        *o = Observed {
            current: count(reply[1 + 2 * i]),
            previous: count(reply[2 + 2 * i]),
        };
    }
    let mut granted = [0; COUNTERS];
    for (i, g) in granted.iter_mut().enumerate() {
        *g = count(reply[1 + 2 * COUNTERS + i]);
    }
    Some(Grant {
        allowed: reply[0] == 1,
        observed,
        granted,
    })
}
