//! The driver's state table as pure functions: what the kernel and the records say of a
//! volume in, what to do out. Nothing here touches a file or the kernel; `mounting.rs` and
//! `lifecycle.rs` observe, ask these functions, and carry the answer out step by step.
//!
//! The rows, for Mount (the table at the top of `driver.rs` says why each is so):
//!
//! | kernel    | records                      | look for copies elsewhere     | then                          |
//! |-----------|------------------------------|-------------------------------|-------------------------------|
//! | mounted   | some, no client gone         | no                            | count one more                |
//! | mounted   | some of gone clients         | yes: held keeps them          | release those, count one more |
//! | mounted   | none (or all released)       | if volatile: held refuses     | volatile: unmount, discard, mount; else reuse |
//! | unmounted | none                         | if the mark says it is due    | discard if volatile, mount    |
//! | unmounted | all from an earlier boot     | no                            | void them, discard if volatile, mount |
//! | unmounted | some of this boot (or Go's)  | yes: held refuses             | void them, discard if volatile, mount |

/// What the mount records of a volume say, as the table reads them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Records {
    None,
    /// Every record names an earlier boot: void after a reboot, nothing can hold them.
    AllFromEarlierBoot,
    /// At least one record is of this boot, or has no boot (written by the Go version).
    SomeOfThisBoot,
}

/// How many records name a client process that is gone (dockerd restarted and forgot them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GoneClients {
    None,
    Some,
    All,
}

/// A volume as Mount finds it, under its lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observed {
    /// The overlay is mounted at the volume's mountpoint in this mount namespace.
    pub mounted: bool,
    pub records: Records,
    pub gone_clients: GoneClients,
    /// overlayfs' `workdir/work` is there: since the overlay was last mounted, nothing made
    /// sure that no copy of it lives on in another mount namespace.
    pub look_due: bool,
    pub volatile: bool,
}

/// What to do when a look for copies of the overlay in other mount namespaces finds one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Look {
    /// No look is needed.
    No,
    /// Refuse the request: a second overlay on the same upper is undefined behaviour.
    RefuseIfHeld,
    /// Keep the records of gone clients: holders cannot be told apart, and a container that
    /// outlived its dockerd (live-restore) may be one of them.
    KeepGoneIfHeld,
}

/// Which look [`plan_mount`] needs before it can decide.
pub fn mount_look(o: &Observed) -> Look {
    match (o.mounted, o.records) {
        (true, Records::None) if o.volatile => Look::RefuseIfHeld,
        (true, Records::None) => Look::No,
        (true, _) if o.gone_clients == GoneClients::None => Look::No,
        (true, _) => Look::KeepGoneIfHeld,
        (false, Records::None) if o.look_due => Look::RefuseIfHeld,
        (false, Records::None) => Look::No,
        (false, Records::AllFromEarlierBoot) => Look::No,
        (false, Records::SomeOfThisBoot) => Look::RefuseIfHeld,
    }
}

/// The steps of a Mount, in the order they are carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MountPlan {
    /// Delete the records of gone clients.
    pub release_gone: bool,
    /// Delete every record (and any temporary beside them): they are void.
    pub void_records: bool,
    /// Unmount the overlay found mounted with nobody on record, so that a volatile volume
    /// starts over.
    pub unmount_stale: bool,
    /// Throw a volatile volume's changes away (into the trash) before mounting.
    pub discard: bool,
    /// Mount the overlay; otherwise it is mounted already and this Mount counts one more use.
    pub mount: bool,
}

/// A request refused because a copy of the overlay is held in another mount namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldElsewhere;

/// The Mount of a volume observed as `o`, once the look [`mount_look`] asked for found a copy
/// (`held`) or not (always `false` when no look was made).
pub fn plan_mount(o: &Observed, held: bool) -> Result<MountPlan, HeldElsewhere> {
    if held && mount_look(o) == Look::RefuseIfHeld {
        return Err(HeldElsewhere);
    }
    let fresh = |void_records| MountPlan {
        void_records,
        discard: o.volatile,
        mount: true,
        ..MountPlan::default()
    };
    if !o.mounted {
        return Ok(fresh(o.records != Records::None));
    }
    let release_gone = o.gone_clients != GoneClients::None && !held;
    let nobody_left =
        o.records == Records::None || release_gone && o.gone_clients == GoneClients::All;
    if nobody_left && o.volatile {
        // An overlay nobody is on record for may carry a dead user's changes: start over.
        // When the records were gone clients', the look just made found no copy.
        if held {
            return Err(HeldElsewhere);
        }
        return Ok(MountPlan {
            release_gone,
            unmount_stale: true,
            ..fresh(false)
        });
    }
    Ok(MountPlan {
        release_gone,
        ..MountPlan::default()
    })
}

/// What an Unmount of one use of a mount ID does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnmountPlan {
    /// The ID has no record: refused.
    UnknownId,
    /// The ID stays in use, one use fewer.
    Decrement,
    /// The ID's record goes; others remain, or the overlay is not mounted here.
    Release,
    /// The last record goes and the overlay is unmounted.
    ReleaseAndUnmount,
}

/// `uses`: the ID's usage count on record (`None`: no record); `others`: other IDs on record.
pub fn plan_unmount(uses: Option<u64>, others: bool, mounted: bool) -> UnmountPlan {
    match uses {
        None => UnmountPlan::UnknownId,
        Some(2..) => UnmountPlan::Decrement,
        Some(_) if others || !mounted => UnmountPlan::Release,
        Some(_) => UnmountPlan::ReleaseAndUnmount,
    }
}

/// The steps of a Remove. dockerd sends Remove only when none of its containers uses the
/// volume, so records are leftovers, but the overlay may live on elsewhere: the janitor would
/// delete the upper under it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemovePlan {
    /// Look for copies elsewhere first, and refuse while one is held.
    pub look: bool,
    /// Unmount the leftover overlay here.
    pub unmount: bool,
}

pub fn plan_remove(mounted: bool, has_records: bool, look_due: bool) -> RemovePlan {
    RemovePlan {
        look: mounted || has_records || look_due,
        unmount: mounted,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observed(mounted: bool, records: Records) -> Observed {
        Observed {
            mounted,
            records,
            gone_clients: GoneClients::None,
            look_due: false,
            volatile: false,
        }
    }

    const COUNT: MountPlan = MountPlan {
        release_gone: false,
        void_records: false,
        unmount_stale: false,
        discard: false,
        mount: false,
    };
    const MOUNT: MountPlan = MountPlan {
        mount: true,
        ..COUNT
    };

    #[test]
    fn mounted_with_records_counts_one_more() {
        let o = observed(true, Records::SomeOfThisBoot);
        assert_eq!(mount_look(&o), Look::No);
        assert_eq!(plan_mount(&o, false), Ok(COUNT));
        let volatile = Observed {
            volatile: true,
            ..o
        };
        assert_eq!(
            plan_mount(&volatile, false),
            Ok(COUNT),
            "in use: no discard"
        );
    }

    #[test]
    fn mounted_with_gone_clients_releases_them_unless_held() {
        let o = Observed {
            gone_clients: GoneClients::Some,
            ..observed(true, Records::SomeOfThisBoot)
        };
        assert_eq!(mount_look(&o), Look::KeepGoneIfHeld);
        let released = MountPlan {
            release_gone: true,
            ..COUNT
        };
        assert_eq!(plan_mount(&o, false), Ok(released));
        assert_eq!(plan_mount(&o, true), Ok(COUNT), "held: kept, never refused");
        // All gone and released: nobody is left, a volatile volume starts over.
        let all = Observed {
            gone_clients: GoneClients::All,
            volatile: true,
            ..o
        };
        assert_eq!(
            plan_mount(&all, false),
            Ok(MountPlan {
                release_gone: true,
                unmount_stale: true,
                discard: true,
                mount: true,
                ..COUNT
            })
        );
        assert_eq!(plan_mount(&all, true), Ok(COUNT), "held: the mounts stay");
        let persistent = Observed {
            volatile: false,
            ..all
        };
        assert_eq!(plan_mount(&persistent, false), Ok(released));
    }

    #[test]
    fn mounted_with_nobody_on_record_is_reused_or_started_over_if_volatile() {
        let o = observed(true, Records::None);
        assert_eq!(mount_look(&o), Look::No);
        assert_eq!(plan_mount(&o, false), Ok(COUNT));
        let volatile = Observed {
            volatile: true,
            ..o
        };
        assert_eq!(mount_look(&volatile), Look::RefuseIfHeld);
        assert_eq!(
            plan_mount(&volatile, false),
            Ok(MountPlan {
                unmount_stale: true,
                discard: true,
                ..MOUNT
            })
        );
        assert_eq!(plan_mount(&volatile, true), Err(HeldElsewhere));
    }

    #[test]
    fn unmounted_and_idle_mounts_looking_only_when_due() {
        let o = observed(false, Records::None);
        assert_eq!(mount_look(&o), Look::No);
        assert_eq!(plan_mount(&o, false), Ok(MOUNT));
        let due = Observed {
            look_due: true,
            ..o
        };
        assert_eq!(mount_look(&due), Look::RefuseIfHeld);
        assert_eq!(plan_mount(&due, false), Ok(MOUNT));
        assert_eq!(plan_mount(&due, true), Err(HeldElsewhere));
        let volatile = Observed {
            volatile: true,
            ..o
        };
        assert_eq!(
            plan_mount(&volatile, false),
            Ok(MountPlan {
                discard: true,
                ..MOUNT
            })
        );
    }

    #[test]
    fn unmounted_with_records_of_an_earlier_boot_voids_them_without_a_look() {
        let o = Observed {
            look_due: true,
            ..observed(false, Records::AllFromEarlierBoot)
        };
        assert_eq!(mount_look(&o), Look::No, "a reboot leaves no copy anywhere");
        let void = MountPlan {
            void_records: true,
            ..MOUNT
        };
        assert_eq!(plan_mount(&o, false), Ok(void));
        let volatile = Observed {
            volatile: true,
            ..o
        };
        assert_eq!(
            plan_mount(&volatile, false),
            Ok(MountPlan {
                discard: true,
                ..void
            })
        );
    }

    #[test]
    fn unmounted_with_records_of_this_boot_looks_and_refuses_while_held() {
        let o = observed(false, Records::SomeOfThisBoot);
        assert_eq!(mount_look(&o), Look::RefuseIfHeld);
        assert_eq!(
            plan_mount(&o, false),
            Ok(MountPlan {
                void_records: true,
                ..MOUNT
            })
        );
        assert_eq!(plan_mount(&o, true), Err(HeldElsewhere));
        // Gone clients change nothing once the overlay is unmounted: all records are void.
        let gone = Observed {
            gone_clients: GoneClients::All,
            ..o
        };
        assert_eq!(mount_look(&gone), Look::RefuseIfHeld);
        assert_eq!(plan_mount(&gone, false), plan_mount(&o, false));
    }

    #[test]
    fn unmount_rows() {
        use UnmountPlan::*;
        assert_eq!(plan_unmount(None, true, true), UnknownId);
        assert_eq!(plan_unmount(Some(3), false, true), Decrement);
        assert_eq!(plan_unmount(Some(2), false, false), Decrement);
        assert_eq!(plan_unmount(Some(1), true, true), Release);
        assert_eq!(plan_unmount(Some(1), false, false), Release);
        assert_eq!(plan_unmount(Some(1), false, true), ReleaseAndUnmount);
        // A record of a Go-made or damaged file reads as one use.
        assert_eq!(plan_unmount(Some(0), false, true), ReleaseAndUnmount);
    }

    #[test]
    fn remove_rows() {
        let plan = |m, r, d| plan_remove(m, r, d);
        assert_eq!(
            plan(false, false, false),
            RemovePlan {
                look: false,
                unmount: false
            }
        );
        for (m, r, d) in [
            (true, false, false),
            (false, true, false),
            (false, false, true),
        ] {
            assert!(plan(m, r, d).look, "{m} {r} {d}");
            assert_eq!(plan(m, r, d).unmount, m);
        }
    }
}
