//! Who may do what: the console's one decision point. Every endpoint names its [`Action`] and
//! the org it touches and calls [`decide`]; nothing else grants access.
//!
//! The matrix (also in docs/console.md, checked against this code by a test):
//!
//! | action             | buyer | seller | admin | super_admin |
//! |--------------------|-------|--------|-------|-------------|
//! | keys.list          | own   | own    | any   | any         |
//! | keys.create        | own   | own    | -     | any         |
//! | keys.rotate        | own   | own    | -     | any         |
//! | keys.revoke        | own   | own    | any   | any         |
//! | credentials.byok   | own   | own    | -     | any         |
//! | credentials.system | -     | own    | -     | any         |
//! | apis.list          | -     | own    | any   | any         |
//! | apis.write         | -     | own    | -     | any         |
//! | usage.read         | own   | own    | any   | any         |
//! | credits.read       | own   | own    | any   | any         |
//! | credits.adjust     | -     | -      | any   | any         |
//! | users.list         | -     | -      | any   | any         |
//! | users.invite       | -     | -      | any   | any         |
//! | users.role         | -     | -      | any   | any         |
//! | users.disable      | -     | -      | any   | any         |
//! | audit.read         | -     | -      | any   | any         |
//!
//! `own`: the caller's org only; `any`: every org. On top of the matrix: an admin invites,
//! changes and disables only buyers and sellers and grants at most seller; only a super_admin
//! grants or removes admin; nobody changes their own role or disables themselves. An org
//! that is not the caller's answers 404 (its existence is not confirmed) before the role is
//! even looked at; an action the role lacks in its own org answers 403.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A console role, lowest first.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum Role {
    Buyer,
    Seller,
    Admin,
    SuperAdmin,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Buyer, Role::Seller, Role::Admin, Role::SuperAdmin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Buyer => "buyer",
            Role::Seller => "seller",
            Role::Admin => "admin",
            Role::SuperAdmin => "super_admin",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// Admins and super_admins work across orgs.
    pub fn is_staff(self) -> bool {
        self >= Role::Admin
    }
}

/// The signed-in user, as the database says now.
#[derive(Debug, Clone, Serialize)]
pub struct Principal {
    pub id: Uuid,
    pub email: String,
    pub role: Role,
    pub org: Option<Uuid>,
}

/// What a request wants to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    ListKeys,
    CreateKey,
    RotateKey,
    RevokeKey,
    WriteByokCredential,
    WriteSystemCredential,
    ListApis,
    WriteApi,
    ReadUsage,
    ReadCredits,
    AdjustCredits,
    ListUsers,
    InviteUser,
    SetRole,
    DisableUser,
    ReadAudit,
    /// Export a person's data (anyone their own, see [`decide_personal_data`]).
    ExportPersonalData,
    ErasePersonalData,
}

impl Action {
    pub const ALL: [Action; 18] = [
        Action::ListKeys,
        Action::CreateKey,
        Action::RotateKey,
        Action::RevokeKey,
        Action::WriteByokCredential,
        Action::WriteSystemCredential,
        Action::ListApis,
        Action::WriteApi,
        Action::ReadUsage,
        Action::ReadCredits,
        Action::AdjustCredits,
        Action::ListUsers,
        Action::InviteUser,
        Action::SetRole,
        Action::DisableUser,
        Action::ReadAudit,
        Action::ExportPersonalData,
        Action::ErasePersonalData,
    ];

    /// The name in the matrix and in audit/metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Action::ListKeys => "keys.list",
            Action::CreateKey => "keys.create",
            Action::RotateKey => "keys.rotate",
            Action::RevokeKey => "keys.revoke",
            Action::WriteByokCredential => "credentials.byok",
            Action::WriteSystemCredential => "credentials.system",
            Action::ListApis => "apis.list",
            Action::WriteApi => "apis.write",
            Action::ReadUsage => "usage.read",
            Action::ReadCredits => "credits.read",
            Action::AdjustCredits => "credits.adjust",
            Action::ListUsers => "users.list",
            Action::InviteUser => "users.invite",
            Action::SetRole => "users.role",
            Action::DisableUser => "users.disable",
            Action::ReadAudit => "audit.read",
            Action::ExportPersonalData => "personal_data.export",
            Action::ErasePersonalData => "personal_data.erase",
        }
    }
}

/// How far a role reaches with an action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    None,
    OwnOrg,
    AnyOrg,
}

/// The matrix.
pub fn reach(role: Role, action: Action) -> Reach {
    use Action::*;
    match role {
        Role::SuperAdmin => Reach::AnyOrg,
        Role::Admin => match action {
            ListKeys | RevokeKey | ListApis | ReadUsage | ReadCredits | AdjustCredits
            | ListUsers | InviteUser | SetRole | DisableUser | ReadAudit | ExportPersonalData
            | ErasePersonalData => Reach::AnyOrg,
            CreateKey | RotateKey | WriteByokCredential | WriteSystemCredential | WriteApi => {
                Reach::None
            }
        },
        Role::Seller => match action {
            ListKeys
            | CreateKey
            | RotateKey
            | RevokeKey
            | WriteByokCredential
            | WriteSystemCredential
            | ListApis
            | WriteApi
            | ReadUsage
            | ReadCredits => Reach::OwnOrg,
            AdjustCredits | ListUsers | InviteUser | SetRole | DisableUser | ReadAudit
            | ExportPersonalData | ErasePersonalData => Reach::None,
        },
        Role::Buyer => match action {
            ListKeys | CreateKey | RotateKey | RevokeKey | WriteByokCredential | ReadUsage
            | ReadCredits => Reach::OwnOrg,
            WriteSystemCredential
            | ListApis
            | WriteApi
            | AdjustCredits
            | ListUsers
            | InviteUser
            | SetRole
            | DisableUser
            | ReadAudit
            | ExportPersonalData
            | ErasePersonalData => Reach::None,
        },
    }
}

/// The answer to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// 404: the org (or the resource in it) is not the caller's to know about.
    NotFound,
    /// 403, with the rule that refused.
    Forbidden(String),
}

/// What a user-management action is about.
#[derive(Debug, Clone, Copy)]
pub struct UserChange {
    /// The user acted on (None for an invitation).
    pub target: Option<(Uuid, Role)>,
    /// The role to grant (invite, role change).
    pub grant: Option<Role>,
}

/// May `p` do `action` in `org` (None: not org-scoped, e.g. the user list)?
pub fn decide(p: &Principal, action: Action, org: Option<Uuid>) -> Decision {
    let reach = reach(p.role, action);
    if let Some(org) = org {
        // Another org's resources do not exist for a tenant user, whatever their role.
        if !p.role.is_staff() && p.org != Some(org) {
            return Decision::NotFound;
        }
        match reach {
            Reach::AnyOrg => Decision::Allow,
            Reach::OwnOrg if p.org == Some(org) => Decision::Allow,
            Reach::OwnOrg => Decision::NotFound,
            Reach::None => {
                Decision::Forbidden(format!("a {} may not {}", p.role.as_str(), action.name()))
            }
        }
    } else {
        match reach {
            Reach::AnyOrg => Decision::Allow,
            _ => Decision::Forbidden(format!("a {} may not {}", p.role.as_str(), action.name())),
        }
    }
}

/// [`decide`] for inviting, re-roling and disabling users: the matrix first, then who may
/// touch whom.
pub fn decide_user_change(p: &Principal, action: Action, change: UserChange) -> Decision {
    let base = decide(p, action, None);
    if base != Decision::Allow {
        return base;
    }
    if let Some((id, _)) = change.target {
        if id == p.id {
            return Decision::Forbidden(match action {
                Action::DisableUser => "nobody disables themselves".into(),
                _ => "nobody changes their own role".into(),
            });
        }
    }
    if p.role == Role::SuperAdmin {
        return Decision::Allow;
    }
    // An admin manages tenants only.
    if let Some((_, role)) = change.target {
        if role.is_staff() {
            return Decision::Forbidden(format!(
                "only a super_admin may change or disable a {}",
                role.as_str()
            ));
        }
    }
    if let Some(role) = change.grant {
        if role.is_staff() {
            return Decision::Forbidden(format!("only a super_admin may grant {}", role.as_str()));
        }
    }
    Decision::Allow
}

/// [`decide`] for a person's data: everyone may export their own; otherwise the matrix, then
/// who may touch whom (an admin: buyers and sellers; nobody erases themselves).
pub fn decide_personal_data(p: &Principal, action: Action, target: (Uuid, Role)) -> Decision {
    if action == Action::ExportPersonalData && target.0 == p.id {
        return Decision::Allow;
    }
    let base = decide(p, action, None);
    if base != Decision::Allow {
        return base;
    }
    if target.0 == p.id {
        return Decision::Forbidden(
            "nobody erases themselves; ask another admin (export first)".into(),
        );
    }
    if p.role != Role::SuperAdmin && target.1.is_staff() {
        return Decision::Forbidden(format!(
            "only a super_admin may {} a {}",
            if action == Action::ErasePersonalData {
                "erase"
            } else {
                "export the data of"
            },
            target.1.as_str()
        ));
    }
    Decision::Allow
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The role matrix in docs/console.md says what [`reach`] does, cell by cell: a cell is `own`, `any`,
    /// `-`, `VERBS: any` (those verbs any org, the row's others none), or `buyers and sellers`
    /// (any org, whom is [`decide_user_change`]'s). Every action has a row, every row is known.
    #[test]
    fn the_readme_matrix_is_the_code_matrix() {
        use Action::*;
        let rows: [(&str, &[(&str, Action)]); 9] = [
            (
                "keys:",
                &[
                    ("list", ListKeys),
                    ("create", CreateKey),
                    ("rotate", RotateKey),
                    ("revoke", RevokeKey),
                ],
            ),
            ("BYOK credentials", &[("write", WriteByokCredential)]),
            ("system credentials", &[("write", WriteSystemCredential)]),
            (
                "APIs:",
                &[
                    ("list", ListApis),
                    ("register", WriteApi),
                    ("update", WriteApi),
                ],
            ),
            (
                "usage, credit balance",
                &[("usage", ReadUsage), ("balance", ReadCredits)],
            ),
            ("credit adjustments", &[("adjust", AdjustCredits)]),
            (
                "users:",
                &[
                    ("list", ListUsers),
                    ("invite", InviteUser),
                    ("change role", SetRole),
                    ("disable", DisableUser),
                ],
            ),
            ("audit log", &[("read", ReadAudit)]),
            (
                "personal data",
                &[("export", ExportPersonalData), ("erase", ErasePersonalData)],
            ),
        ];
        let readme = include_str!("../../docs/console.md");
        let section = &readme[readme.find("# The console").expect("the console page")..];
        let table: Vec<Vec<&str>> = section
            .lines()
            .skip_while(|l| !l.starts_with("| action |"))
            .skip(2)
            .take_while(|l| l.starts_with('|'))
            .map(|l| l.trim_matches('|').split('|').map(str::trim).collect())
            .collect();
        assert_eq!(
            table.len(),
            rows.len(),
            "a docs/console.md row without a mapping here, or the reverse"
        );
        let roles = [Role::Buyer, Role::Seller, Role::Admin, Role::SuperAdmin];
        let mut covered = std::collections::HashSet::new();
        for line in &table {
            let (_, actions) = rows
                .iter()
                .find(|(label, _)| line[0].starts_with(label))
                .unwrap_or_else(|| panic!("docs/console.md row {:?} has no mapping", line[0]));
            for (role, cell) in roles.iter().zip(&line[1..]) {
                for (verb, action) in actions.iter() {
                    covered.insert(*action);
                    let want = match *cell {
                        "own" => Reach::OwnOrg,
                        "any" | "buyers and sellers" => Reach::AnyOrg,
                        "-" => Reach::None,
                        other => {
                            let (verbs, scope) = other.split_once(": ").unwrap_or_else(|| {
                                panic!("cell {other:?} is not in the matrix's language")
                            });
                            assert_eq!(scope, "any", "{other:?}");
                            if verbs.split(", ").any(|v| v == *verb) {
                                Reach::AnyOrg
                            } else {
                                Reach::None
                            }
                        }
                    };
                    assert_eq!(
                        reach(*role, *action),
                        want,
                        "{} {} ({}): docs/console.md says {cell:?}",
                        role.as_str(),
                        verb,
                        line[0]
                    );
                }
            }
        }
        for action in Action::ALL {
            assert!(
                covered.contains(&action),
                "{} is not in the matrix of docs/console.md",
                action.name()
            );
        }
    }

    fn who(role: Role, org: Option<Uuid>) -> Principal {
        Principal {
            id: Uuid::new_v4(),
            email: "x@y.z".into(),
            role,
            org,
        }
    }

    /// Every role × action × (own org, other org, no org): the decision follows the matrix
    /// and a tenant never learns of another org.
    #[test]
    fn every_role_and_action_follows_the_matrix() {
        let own = Uuid::new_v4();
        let other = Uuid::new_v4();
        for role in Role::ALL {
            let p = who(role, (!role.is_staff()).then_some(own));
            for action in Action::ALL {
                let r = reach(role, action);
                let in_own = decide(&p, action, Some(own));
                let in_other = decide(&p, action, Some(other));
                match r {
                    Reach::AnyOrg => {
                        assert_eq!(in_other, Decision::Allow, "{role:?} {action:?}");
                        if !role.is_staff() {
                            unreachable!("a tenant role reaches any org: {role:?} {action:?}");
                        }
                    }
                    Reach::OwnOrg => {
                        assert_eq!(in_own, Decision::Allow, "{role:?} {action:?}");
                        assert_eq!(in_other, Decision::NotFound, "{role:?} {action:?}");
                    }
                    Reach::None => {
                        assert!(
                            matches!(in_own, Decision::Forbidden(_))
                                || !role.is_staff() && in_own == Decision::NotFound
                        );
                    }
                }
                if !role.is_staff() {
                    assert_eq!(
                        in_other,
                        Decision::NotFound,
                        "{role:?} {action:?} leaks another org"
                    );
                    assert!(!matches!(r, Reach::AnyOrg), "{role:?} {action:?}");
                }
            }
        }
    }

    #[test]
    fn user_changes_respect_rank_and_self() {
        let admin = who(Role::Admin, None);
        let sup = who(Role::SuperAdmin, None);
        let buyer = who(Role::Buyer, Some(Uuid::new_v4()));
        let t = |role| Some((Uuid::new_v4(), role));
        let allow = Decision::Allow;
        let cases = [
            (&admin, Action::InviteUser, None, Some(Role::Seller), true),
            (&admin, Action::InviteUser, None, Some(Role::Admin), false),
            (
                &admin,
                Action::SetRole,
                t(Role::Buyer),
                Some(Role::Seller),
                true,
            ),
            (
                &admin,
                Action::SetRole,
                t(Role::Seller),
                Some(Role::Admin),
                false,
            ),
            (
                &admin,
                Action::SetRole,
                t(Role::Admin),
                Some(Role::Buyer),
                false,
            ),
            (
                &admin,
                Action::SetRole,
                t(Role::SuperAdmin),
                Some(Role::Buyer),
                false,
            ),
            (&admin, Action::DisableUser, t(Role::Seller), None, true),
            (&admin, Action::DisableUser, t(Role::Admin), None, false),
            (
                &admin,
                Action::SetRole,
                Some((admin.id, Role::Admin)),
                Some(Role::Buyer),
                false,
            ),
            (
                &sup,
                Action::SetRole,
                t(Role::Admin),
                Some(Role::Buyer),
                true,
            ),
            (
                &sup,
                Action::SetRole,
                t(Role::Buyer),
                Some(Role::Admin),
                true,
            ),
            (&sup, Action::InviteUser, None, Some(Role::Admin), true),
            (
                &sup,
                Action::SetRole,
                Some((sup.id, Role::SuperAdmin)),
                Some(Role::Admin),
                false,
            ),
            (
                &sup,
                Action::DisableUser,
                Some((sup.id, Role::SuperAdmin)),
                None,
                false,
            ),
            (&buyer, Action::InviteUser, None, Some(Role::Buyer), false),
            (
                &buyer,
                Action::SetRole,
                t(Role::Buyer),
                Some(Role::Seller),
                false,
            ),
        ];
        for (p, action, target, grant, ok) in cases {
            let d = decide_user_change(p, action, UserChange { target, grant });
            assert_eq!(
                d == allow,
                ok,
                "{:?} {action:?} {target:?} {grant:?}: {d:?}",
                p.role
            );
        }
    }

    #[test]
    fn roles_round_trip_their_names() {
        for r in Role::ALL {
            assert_eq!(Role::parse(r.as_str()), Some(r));
            assert_eq!(serde_json::to_value(r).unwrap(), r.as_str());
        }
        assert_eq!(Role::parse("root"), None);
    }
}
