//! Tells the tests which shared servers this run has: `tp_redis` when REDIS_URL is set,
//! `tp_postgres` when DATABASE_URL is, `tp_mysql` when MYSQL_URL is, so a test that needs one is `ignored` without it
//! (visible in the summary) instead of returning early as a pass. The library ignores
//! these cfgs, and the published package leaves this script out (see `exclude`).

fn main() {
    for (var, cfg) in [
        ("REDIS_URL", "tp_redis"),
        ("DATABASE_URL", "tp_postgres"),
        ("MYSQL_URL", "tp_mysql"),
    ] {
        println!("cargo::rerun-if-env-changed={var}");
        if std::env::var_os(var).is_some_and(|v| !v.is_empty()) {
            println!("cargo::rustc-cfg={cfg}");
        }
    }
}
