//! Disaster-recovery tables: `[[dr_group]]` at the production site (a consistency group of
//! bdevs streamed to a DR site) and `[[dr_replica]]` at the DR site (where a group's stream is
//! applied).
//!
//! ```toml
//! [[dr_group]]
//! name = "g1"
//! members = ["db-data", "db-log"]   # bdevs, in the group's order (the DR site's in the same)
//! dr_site = "10.0.3.1:7400"
//! mode = "async"                    # "async" (short-throw, default), "long-throw" or "sync"
//! buffer = "64MiB"                  # send buffer; when full, async host writes wait
//! # long-throw: the buffer spills to a journal file; when that is full too, writes are tracked
//! # by region and copied later (hosts never wait; the DR image is not consistent meanwhile)
//! # journal = "/var/lib/nvmetro/g1.journal"   # required in long-throw
//! # journal_size = "1GiB"
//! rpo_target = "5s"                 # optional: an alarm when the DR image is older
//! copy_rate = "200MiB"              # optional: bytes a copy reads per second at most
//! state = "/var/lib/nvmetro/g1.dr"  # sequence numbers and the full copy's progress
//! secret_file = "/etc/nvmetro/dr.secret"
//!
//! [[dr_replica]]
//! name = "g1"
//! members = ["dr-data", "dr-log"]
//! listen = "0.0.0.0:7400"
//! state = "/var/lib/nvmetro/g1.applied"
//! secret_file = "/etc/nvmetro/dr.secret"
//! ```

use super::*;

/// `[[dr_group]]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrGroupSection {
    pub name: Spanned<String>,
    pub members: Spanned<Vec<String>>,
    pub dr_site: Spanned<String>,
    pub mode: Option<Spanned<String>>,
    pub buffer: Option<Spanned<Size>>,
    pub rpo_target: Option<Spanned<String>>,
    pub state: Spanned<PathBuf>,
    pub secret: Option<Spanned<String>>,
    pub secret_file: Option<Spanned<PathBuf>>,
    /// Added to each direction of the stream, e.g. "10ms" (tests and benchmarks emulating
    /// distance).
    pub link_delay: Option<Spanned<String>>,
    /// Bytes per second a copy (initial, after a restart or takeover, catch-up) reads at most.
    pub copy_rate: Option<Spanned<Size>>,
    /// Long-throw: the file the send buffer spills to, and its size (default 1GiB).
    pub journal: Option<Spanned<PathBuf>>,
    pub journal_size: Option<Spanned<Size>>,
}

/// `[[dr_replica]]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrReplicaSection {
    pub name: Spanned<String>,
    pub members: Spanned<Vec<String>>,
    pub listen: Spanned<String>,
    pub state: Spanned<PathBuf>,
    pub secret: Option<Spanned<String>>,
    pub secret_file: Option<Spanned<PathBuf>>,
}

/// How a group's host writes are acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrModeConfig {
    Sync,
    Async,
    /// Async, and host writes never wait: the buffer spills to the journal, then overflows.
    LongThrow,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrGroupConfig {
    pub name: String,
    pub members: Vec<String>,
    pub dr_site: SocketAddr,
    pub mode: DrModeConfig,
    pub buffer: u64,
    pub rpo_target: Option<std::time::Duration>,
    pub state: PathBuf,
    pub secret: Vec<u8>,
    pub link_delay: std::time::Duration,
    /// Bytes per second a copy reads at most (none: as fast as the buffer lets it).
    pub copy_rate: Option<u64>,
    /// Long-throw: the journal file and its size (set exactly in long-throw mode).
    pub journal: Option<(PathBuf, u64)>,
    /// Every member is a mirror: the group wraps each mirror's local leg at both metro sites,
    /// and the site that orders the writes feeds the DR site.
    pub follows_metro: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrReplicaConfig {
    pub name: String,
    pub members: Vec<String>,
    pub listen: SocketAddr,
    pub state: PathBuf,
    pub secret: Vec<u8>,
}

/// The send buffer when `buffer` is not given.
pub const DEFAULT_DR_BUFFER: u64 = 64 << 20;
/// A long-throw journal's size when `journal_size` is not given.
pub const DEFAULT_DR_JOURNAL: u64 = 1 << 30;

/// Members must be bdevs of this config, each in one group at most, and not the base of another
/// bdev (writes through that one would bypass the group). At a DR site a member may be a
/// namespace: hosts see it Inaccessible until the image is promoted.
fn members(
    ctx: &Ctx,
    table: &str,
    m: &Spanned<Vec<String>>,
    bdevs: &[BdevConfig],
    taken: &mut HashSet<String>,
) -> Result<Vec<String>, ConfigError> {
    let key = format!("{table}.members");
    if m.get_ref().is_empty() {
        return Err(ctx.err(m.span(), &key, "a group needs at least one member bdev"));
    }
    for name in m.get_ref() {
        if !bdevs.iter().any(|b| &b.name == name) {
            return Err(ctx.err(m.span(), &key, format!("no bdev named `{name}`")));
        }
        if let Some(over) = bdevs.iter().find(|b| b.depends_on() == Some(name.as_str())) {
            return Err(ctx.err(
                m.span(),
                &key,
                format!(
                    "bdev `{name}` is the base of bdev `{}`: writes through it would bypass the group; make `{}` the member",
                    over.name, over.name
                ),
            ));
        }
        if !taken.insert(name.clone()) {
            return Err(ctx.err(m.span(), &key, format!("bdev `{name}` is a member twice (of this group or another)")));
        }
    }
    Ok(m.get_ref().clone())
}

/// Whether `name` is built on a mirror (an error bdev over a mirror): the group cannot wrap
/// the mirror's leg beneath it, and the other site's writes would reach the leg without
/// passing the group.
fn over_mirror(name: &str, bdevs: &[BdevConfig]) -> bool {
    let Some(b) = bdevs.iter().find(|b| b.name == name) else { return false };
    let Some(mut at) = b.depends_on().filter(|_| b.kind != BdevKind::Mirror) else { return false };
    // A chain is at most as long as the bdev list (validation refuses cycles).
    for _ in 0..=bdevs.len() {
        let Some(b) = bdevs.iter().find(|b| b.name == at) else { return false };
        if b.kind == BdevKind::Mirror {
            return true;
        }
        match b.depends_on() {
            Some(base) => at = base,
            None => return false,
        }
    }
    false
}

fn name(ctx: &Ctx, table: &str, n: &Spanned<String>, names: &mut HashSet<String>) -> Result<String, ConfigError> {
    let v = n.get_ref();
    if v.is_empty() || !v.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) || !names.insert(v.clone()) {
        return Err(ctx.err(
            n.span(),
            &format!("{table}.name"),
            format!("`{v}` is empty, used twice, or not letters, digits, `-`, `_` and `.`"),
        ));
    }
    Ok(v.clone())
}

fn address(ctx: &Ctx, key: &str, a: &Spanned<String>) -> Result<SocketAddr, ConfigError> {
    a.get_ref().parse().map_err(|_| ctx.err(a.span(), key, format!("`{}` is not an address:port", a.get_ref())))
}

pub(crate) fn validate_dr(
    ctx: &Ctx,
    raw: &RawConfig,
    bdevs: &[BdevConfig],
) -> Result<(Vec<DrGroupConfig>, Vec<DrReplicaConfig>), ConfigError> {
    let mut taken = HashSet::new();
    let mut names = HashSet::new();
    let mut groups = Vec::new();
    for g in &raw.dr_groups {
        let name = name(ctx, "dr_group", &g.name, &mut names)?;
        let members = members(ctx, "dr_group", &g.members, bdevs, &mut taken)?;
        // A mirror takes writes at both sites: the group wraps its leg, which every write
        // reaches. Over anything built on a mirror the other site's writes would bypass it.
        if let Some(m) = members.iter().find(|m| over_mirror(m, bdevs)) {
            return Err(ctx.err(
                g.members.span(),
                "dr_group.members",
                format!(
                    "bdev `{m}` is built on a mirror: make the mirror itself the member (the group then wraps its local leg at both sites)"
                ),
            ));
        }
        let is_mirror = |m: &String| bdevs.iter().any(|b| &b.name == m && b.kind == BdevKind::Mirror);
        let follows_metro = members.iter().any(is_mirror);
        if follows_metro && !members.iter().all(is_mirror) {
            return Err(ctx.err(
                g.members.span(),
                "dr_group.members",
                "a group's members are all mirrors (fed by the site that orders their writes) or none is",
            ));
        }
        let mode = match g.mode.as_ref().map(|m| m.get_ref().as_str()) {
            None | Some("async") => DrModeConfig::Async,
            Some("sync") => DrModeConfig::Sync,
            Some("long-throw") => DrModeConfig::LongThrow,
            Some(other) => {
                let span = g.mode.as_ref().expect("given").span();
                return Err(ctx.err(span, "dr_group.mode", format!("`{other}` is not \"sync\", \"async\" or \"long-throw\"")));
            }
        };
        let buffer = match &g.buffer {
            None => DEFAULT_DR_BUFFER,
            Some(b) if b.get_ref().bytes() >= 1 << 20 => b.get_ref().bytes(),
            Some(b) => return Err(ctx.err(b.span(), "dr_group.buffer", "the send buffer needs at least 1MiB (one frame)")),
        };
        let rpo_target =
            match &g.rpo_target {
                None => None,
                Some(t) => Some(parse_duration(t.get_ref()).filter(|d| !d.is_zero()).ok_or_else(|| {
                    ctx.err(t.span(), "dr_group.rpo_target", format!("`{}` is not a duration such as \"5s\"", t.get_ref()))
                })?),
            };
        let link_delay = match &g.link_delay {
            None => std::time::Duration::ZERO,
            Some(t) => parse_duration(t.get_ref())
                .filter(|d| *d <= std::time::Duration::from_secs(1))
                .ok_or_else(|| ctx.err(t.span(), "dr_group.link_delay", format!("`{}` is not a duration up to 1s", t.get_ref())))?,
        };
        let copy_rate = match &g.copy_rate {
            None => None,
            Some(r) if r.get_ref().bytes() >= 1 << 20 => Some(r.get_ref().bytes()),
            Some(r) => return Err(ctx.err(r.span(), "dr_group.copy_rate", "a copy reads at least 1MiB a second (one region)")),
        };
        let journal = match (&g.journal, mode) {
            (Some(j), DrModeConfig::LongThrow) => {
                if let Some(e) = check_parent(ctx, j, "dr_group.journal") {
                    return Err(e);
                }
                let size = match &g.journal_size {
                    None => DEFAULT_DR_JOURNAL,
                    Some(z) if z.get_ref().bytes() >= 1 << 20 => z.get_ref().bytes(),
                    Some(z) => return Err(ctx.err(z.span(), "dr_group.journal_size", "the journal needs at least 1MiB")),
                };
                Some((j.get_ref().clone(), size))
            }
            (Some(j), _) => return Err(ctx.err(j.span(), "dr_group.journal", "a journal belongs to mode = \"long-throw\"")),
            (None, DrModeConfig::LongThrow) => {
                return Err(ctx.err(
                    g.name.span(),
                    "dr_group.journal",
                    "mode = \"long-throw\" needs `journal` (the file the send buffer spills to)",
                ))
            }
            (None, _) => {
                if let Some(z) = &g.journal_size {
                    return Err(ctx.err(z.span(), "dr_group.journal_size", "journal_size needs `journal` (and mode = \"long-throw\")"));
                }
                None
            }
        };
        if let Some(e) = check_parent(ctx, &g.state, "dr_group.state") {
            return Err(e);
        }
        groups.push(DrGroupConfig {
            name,
            members,
            dr_site: address(ctx, "dr_group.dr_site", &g.dr_site)?,
            mode,
            buffer,
            rpo_target,
            state: g.state.get_ref().clone(),
            secret: read_secret(ctx, "dr_group.", g.secret.as_ref(), g.secret_file.as_ref(), &g.name)?,
            link_delay,
            copy_rate,
            journal,
            follows_metro,
        });
    }
    let mut replicas = Vec::new();
    for r in &raw.dr_replicas {
        let name = name(ctx, "dr_replica", &r.name, &mut names)?;
        let members = members(ctx, "dr_replica", &r.members, bdevs, &mut taken)?;
        if let Some(e) = check_parent(ctx, &r.state, "dr_replica.state") {
            return Err(e);
        }
        replicas.push(DrReplicaConfig {
            name,
            members,
            listen: address(ctx, "dr_replica.listen", &r.listen)?,
            state: r.state.get_ref().clone(),
            secret: read_secret(ctx, "dr_replica.", r.secret.as_ref(), r.secret_file.as_ref(), &r.name)?,
        });
    }
    Ok((groups, replicas))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[[bdev]]
name = "a"
kind = "malloc"
size = "4MiB"

[[bdev]]
name = "b"
kind = "malloc"
size = "4MiB"

[[bdev]]
name = "c"
kind = "malloc"
size = "4MiB"

[[subsystem]]
nqn = "nqn.2026-12.io.nvmetro:dr"
allow_any_host = true

[[subsystem.namespace]]
nsid = 1
bdev = "a"

[[listener]]
address = "127.0.0.1:4420"
"#;

    fn group(extra: &str) -> String {
        format!("{BASE}\n[[dr_group]]\nname = \"g1\"\nmembers = [\"a\", \"b\"]\ndr_site = \"127.0.0.1:7400\"\nstate = \"/tmp/g1.dr\"\nsecret = \"0123456789abcdef\"\n{extra}")
    }

    #[test]
    fn copy_rate_is_bytes_a_second_of_at_least_one_region() {
        assert_eq!(parse(&group(""), "g.toml").unwrap().dr_groups[0].copy_rate, None, "unlimited by default");
        assert_eq!(parse(&group("copy_rate = \"200MiB\""), "g.toml").unwrap().dr_groups[0].copy_rate, Some(200 << 20));
        let e = parse(&group("copy_rate = \"64KiB\""), "g.toml").unwrap_err();
        assert!(e.message.contains("dr_group.copy_rate") || e.to_string().contains("dr_group.copy_rate"), "{e}");
    }

    #[test]
    fn a_group_parses_with_its_defaults_and_its_mistakes_name_their_keys() {
        let c = parse(&group(""), "g.toml").unwrap();
        let g = &c.dr_groups[0];
        assert_eq!((g.mode, g.buffer, g.rpo_target), (DrModeConfig::Async, DEFAULT_DR_BUFFER, None));
        assert_eq!(g.members, ["a", "b"]);
        let c = parse(&group("mode = \"long-throw\"\njournal = \"/tmp/g1.journal\""), "g.toml").unwrap();
        assert_eq!(
            (c.dr_groups[0].mode, c.dr_groups[0].journal.clone()),
            (DrModeConfig::LongThrow, Some(("/tmp/g1.journal".into(), DEFAULT_DR_JOURNAL)))
        );
        let c = parse(&group("mode = \"sync\"\nbuffer = \"8MiB\"\nrpo_target = \"2s\""), "g.toml").unwrap();
        let g = &c.dr_groups[0];
        assert_eq!((g.mode, g.buffer, g.rpo_target), (DrModeConfig::Sync, 8 << 20, Some(std::time::Duration::from_secs(2))));
        for (extra, key) in [
            ("mode = \"fast\"", "dr_group.mode"),
            ("buffer = \"4KiB\"", "dr_group.buffer"),
            ("rpo_target = \"soon\"", "dr_group.rpo_target"),
            ("speed = 1", "dr_group.speed"),
            ("link_delay = \"2s\"", "dr_group.link_delay"),
            ("journal = \"/tmp/j\"", "dr_group.journal"),
            ("journal_size = \"8MiB\"", "dr_group.journal_size"),
            ("mode = \"long-throw\"\njournal = \"/tmp/j\"\njournal_size = \"4KiB\"", "dr_group.journal_size"),
            ("mode = \"long-throw\"", "dr_group.journal"),
        ] {
            let e = parse(&group(extra), "g.toml").unwrap_err();
            assert_eq!(e.key, key, "{extra}: {e}");
            assert!(e.line > 23, "{e}");
        }
        let e = parse(&group("").replace("[\"a\", \"b\"]", "[\"a\", \"x\"]"), "g.toml").unwrap_err();
        assert_eq!(e.key, "dr_group.members");
        assert!(e.message.contains("no bdev named `x`"), "{e}");
        let e = parse(&group("").replace("/tmp/g1.dr", "/nonexistent-dir/g1.dr"), "g.toml").unwrap_err();
        assert_eq!(e.key, "dr_group.state");
        let e = parse(&group("").replace("127.0.0.1:7400", "far away"), "g.toml").unwrap_err();
        assert_eq!(e.key, "dr_group.dr_site");
        let e = parse(&group("").replace("secret = \"0123456789abcdef\"", ""), "g.toml").unwrap_err();
        assert_eq!(e.key, "dr_group.secret");
        let leg = "[[bdev]]\nname = \"f\"\nkind = \"file\"\npath = \"/tmp/f.img\"\nsize = \"4MiB\"\n\n";
        let mirror = "[[bdev]]\nname = \"m\"\nkind = \"mirror\"\nlocal = \"f\"\nrole = \"preferred\"\nsite = 1\nlisten = \"127.0.0.1:7500\"\nmetadata = \"/tmp/m.meta\"\n\n";
        let mirrored =
            group("").replace("[[subsystem]]", &format!("{leg}{mirror}[[subsystem]]")).replace("[\"a\", \"b\"]", "[\"a\", \"m\"]");
        let e = parse(&mirrored, "g.toml").unwrap_err();
        assert_eq!(e.key, "dr_group.members", "{e}");
        assert!(e.message.contains("all mirrors") && e.message.contains("or none"), "a mirror beside a plain bdev: {e}");
        let only_mirrors = group("").replace("[[subsystem]]", &format!("{leg}{mirror}[[subsystem]]")).replace("[\"a\", \"b\"]", "[\"m\"]");
        let c = parse(&only_mirrors, "g.toml").unwrap();
        assert!(c.dr_groups[0].follows_metro, "a group of mirrors follows the metro");
        assert!(!parse(&group(""), "g.toml").unwrap().dr_groups[0].follows_metro);
        let wrapped = group("")
            .replace("[[subsystem]]", &format!("{leg}{mirror}[[bdev]]\nname = \"x\"\nkind = \"error\"\nbase = \"m\"\n\n[[subsystem]]"))
            .replace("[\"a\", \"b\"]", "[\"a\", \"x\"]");
        let e = parse(&wrapped, "g.toml").unwrap_err();
        assert!(e.key == "dr_group.members" && e.message.contains("`x` is built on a mirror"), "an error bdev over a mirror: {e}");
    }

    #[test]
    fn a_replica_may_serve_its_members_and_a_bdev_is_in_one_group() {
        let replica = |members: &str| {
            format!("{BASE}\n[[dr_replica]]\nname = \"g1\"\nmembers = {members}\nlisten = \"0.0.0.0:7400\"\nstate = \"/tmp/g1.applied\"\nsecret = \"0123456789abcdef\"\n")
        };
        let c = parse(&replica("[\"b\", \"c\"]"), "r.toml").unwrap();
        assert_eq!(c.dr_replicas[0].members, ["b", "c"]);
        assert_eq!(parse(&replica("[\"a\", \"c\"]"), "r.toml").unwrap().dr_replicas[0].members, ["a", "c"], "a namespace");
        let both = format!("{}\n[[dr_replica]]\nname = \"g2\"\nmembers = [\"b\"]\nlisten = \"0.0.0.0:7401\"\nstate = \"/tmp/g2\"\nsecret = \"0123456789abcdef\"\n", group(""));
        let e = parse(&both, "r.toml").unwrap_err();
        assert!(e.message.contains("`b` is a member twice"), "{e}");
    }
}
