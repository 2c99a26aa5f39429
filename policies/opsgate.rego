# opsgate default policy: may this action be proposed/executed, and who approves it?
#
# Entry points (see DESIGN.md, "Policy contract"):
#   data.opsgate.decision  {"allow", "deny": [{"code", "message"}], "required_approvals",
#                           "approver_roles"}; always defined.
#   data.opsgate.approval  {"allow", "deny"} for the same input plus input.approver.
#
# Tunables live in data.json next to this file (roles, allowlist, param_bounds,
# propose_roles, approver_roles, run_roles, freeze_windows, max_required_approvals).
#
# Written for rego-cpp (regopy) as well as OPA. rego-cpp quirks avoided here:
#   - no top-level commas inside comprehension bodies (`[x | some i, x in xs]` fails to parse);
#   - time.parse_rfc3339_ns rejects a trailing "Z": timestamps are normalised to "+00:00";
#   - no net.cidr_* builtins, no sprintf %d / %q (use %v / %s);
#   - no sort(), max() or min(): rego-cpp orders numbers of different lengths as text;
#   - a string built by concat/upper/trim_* keeps literal quotes when passed to sprintf,
#     so messages only interpolate input/data values, numbers and collections.
# Every builtin used here has a test in opsgate_test.rego (test_builtin_*), so a builtin
# that errors in the engine fails `opsgate policy test` instead of failing closed in prod.
package opsgate

import rego.v1

# ---------------------------------------------------------------------------
# Input, read defensively: a missing field must deny, never make a deny rule undefined.

# Object-valued input fields; {} / [] when absent or of the wrong type.
default action := {}

action := input.action if is_object(input.action)

default proposer := {}

proposer := input.proposer if is_object(input.proposer)

default incident := {}

incident := input.incident if is_object(input.incident)

default verification := {}

verification := input.verification if is_object(input.verification)

default preconditions := []

preconditions := input.preconditions if is_array(input.preconditions)

default context := {}

context := input.context if is_object(input.context)

default approver := {}

approver := input.approver if is_object(input.approver)

action_type := object.get(action, "type", "")

environment := object.get(action, "environment", "")

target := object.get(action, "target", "")

default params := {}

params := action.params if is_object(action.params)

risk := object.get(action, "risk", "")

proposer_id := object.get(proposer, "id", "")

# Only an explicit `reversible: true` counts as reversible.
irreversible if not action.reversible == true

is_agent if proposer.kind == "agent"

# now_ns from the input; falls back to parsing context.now.
now_ns := context.now_ns if {
	is_number(context.now_ns)
} else := parse_time_ns(context.now)

# ---------------------------------------------------------------------------
# Bundle data, with defaults so that the decision stays defined without data.json.

default role_table := {}

role_table := data.roles if is_object(data.roles)

default allowlist_table := {}

allowlist_table := data.allowlist if is_object(data.allowlist)

default param_bounds_table := {}

param_bounds_table := data.param_bounds if is_object(data.param_bounds)

default propose_roles_table := {}

propose_roles_table := data.propose_roles if is_object(data.propose_roles)

default approver_roles_table := {}

approver_roles_table := data.approver_roles if is_object(data.approver_roles)

default freeze_windows := []

freeze_windows := data.freeze_windows if is_array(data.freeze_windows)

default max_required_approvals := 3

max_required_approvals := data.max_required_approvals if is_number(data.max_required_approvals)

roles_of(id) := object.get(role_table, id, [])

# A per-environment table entry, falling back to its "default" key, else [].
env_entry(table) := table[environment] if {
	table[environment]
} else := table["default"] if {
	table["default"]
} else := []

proposer_roles := roles_of(proposer_id)

allowed_types := object.get(allowlist_table, environment, [])

propose_roles := env_entry(propose_roles_table)

approver_roles := env_entry(approver_roles_table)

# ---------------------------------------------------------------------------
# Helpers

violation(code, message) := {"code": code, "message": message}

# RFC 3339 to epoch ns; a trailing "Z" is rewritten because rego-cpp rejects it.
parse_time_ns(ts) := time.parse_rfc3339_ns(concat("", [trim_suffix(ts, "Z"), "+00:00"])) if {
	endswith(ts, "Z")
} else := time.parse_rfc3339_ns(ts)

# A JSON-ish list for messages, e.g. ["sre", "sre-lead"], in the data's order. (Not sort:
# rego-cpp orders numbers as text. Not concat: in rego-cpp a string made by
# concat/upper/trim_* keeps its quotes when passed through sprintf.)
list_text(xs) := sprintf("%v", [[x | some x in xs]])

has_any_role(roles, wanted) if {
	some role in roles
	role in wanted
}

precondition_named(name) := p if {
	some p in preconditions
	p.name == name
}

precondition_failed(name) if {
	p := precondition_named(name)
	not p.ok == true
}

precondition_detail(p) := sprintf(" (%v)", [p.error]) if {
	is_string(p.error)
	p.error != ""
} else := sprintf(" (value %v)", [p.value]) if {
	p.value != null
} else := ""

# ---------------------------------------------------------------------------
# not_allowlisted

deny contains violation("not_allowlisted", msg) if {
	not action_type in allowed_types
	count(allowed_types) > 0
	msg := sprintf(
		"action type %s is not allowlisted in %s; allowed there: %s",
		[action_type, environment, list_text(allowed_types)],
	)
}

deny contains violation("not_allowlisted", msg) if {
	count(allowed_types) == 0
	msg := sprintf(
		"environment %s has no allowlist in the policy bundle, so no action (%s) may run there",
		[environment, action_type],
	)
}

# ---------------------------------------------------------------------------
# param_out_of_bounds: data.param_bounds[type][param][environment | "default"] = {min?, max?}

bounds[param] := [scope, b] if {
	some param, per_env in object.get(param_bounds_table, action_type, {})
	per_env[environment]
	scope := environment
	b := per_env[environment]
}

bounds[param] := ["default", b] if {
	some param, per_env in object.get(param_bounds_table, action_type, {})
	not per_env[environment]
	b := per_env["default"]
}

deny contains violation("param_out_of_bounds", msg) if {
	some param, [scope, b] in bounds
	value := params[param]
	is_number(value)
	is_number(b.max)
	value > b.max
	msg := sprintf(
		"%s=%v exceeds the %s bound of %v; propose %s <= %v",
		[param, value, scope, b.max, param, b.max],
	)
}

deny contains violation("param_out_of_bounds", msg) if {
	some param, [scope, b] in bounds
	value := params[param]
	is_number(value)
	is_number(b.min)
	value < b.min
	msg := sprintf(
		"%s=%v is below the %s minimum of %v; propose %s >= %v",
		[param, value, scope, b.min, param, b.min],
	)
}

# A bounded parameter that is not a number cannot be checked: deny.
deny contains violation("param_out_of_bounds", msg) if {
	some param, _ in bounds
	value := params[param]
	not is_number(value)
	msg := sprintf(
		"%s=%v is not a number, so the %s bounds for %s cannot be checked",
		[param, value, environment, action_type],
	)
}

# Relative bound in prod: never scale above 3x the current replica count.
replica_growth_limit := 3

deny contains violation("param_out_of_bounds", msg) if {
	environment == "prod"
	replicas := params.replicas
	is_number(replicas)
	current := precondition_named("current_replicas")
	current.ok == true
	is_number(current.value)
	current.value > 0
	limit := replica_growth_limit * current.value
	replicas > limit
	msg := sprintf(
		"replicas=%v is more than %vx the current %v replicas in prod; propose replicas <= %v and scale in steps",
		[replicas, replica_growth_limit, current.value, limit],
	)
}

# ---------------------------------------------------------------------------
# missing_precondition (change_freeze and concurrent_action have their own codes)

own_code_preconditions := {"change_freeze", "concurrent_action"}

deny contains violation("missing_precondition", msg) if {
	some p in preconditions
	object.get(p, "required", false) == true
	not p.ok == true
	name := object.get(p, "name", "")
	not name in own_code_preconditions
	msg := sprintf(
		"required precondition %s is not met%s; wait until it holds or fix the check",
		[name, precondition_detail(p)],
	)
}

# ---------------------------------------------------------------------------
# insufficient_permissions

deny contains violation("insufficient_permissions", msg) if {
	not has_any_role(proposer_roles, propose_roles)
	msg := sprintf(
		"proposer %s has roles %s; proposing in %s needs one of %s",
		[proposer_id, list_text(proposer_roles), environment, list_text(propose_roles)],
	)
}

deny contains violation("insufficient_permissions", msg) if {
	is_agent
	risk == "critical"
	msg := sprintf(
		"agent %s may not propose %s: its risk is critical; a human must propose it",
		[proposer_id, action_type],
	)
}

deny contains violation("insufficient_permissions", msg) if {
	is_agent
	environment == "prod"
	irreversible
	msg := sprintf(
		"agent %s may not propose %s in prod: it is irreversible; a human must propose it",
		[proposer_id, action_type],
	)
}

# ---------------------------------------------------------------------------
# verification_undefined

deny contains violation("verification_undefined", msg) if {
	not verification.defined == true
	msg := sprintf(
		"%s has no verification defined; add signals and stop conditions to its catalog entry",
		[action_type],
	)
}

positive(x) if {
	is_number(x)
	x > 0
}

deny contains violation("verification_undefined", msg) if {
	verification.defined == true
	not positive(verification.signals)
	msg := sprintf(
		"%s defines no verification signals; add at least one signal with a pass range",
		[action_type],
	)
}

deny contains violation("verification_undefined", msg) if {
	verification.defined == true
	not positive(verification.stop_conditions)
	msg := sprintf(
		"%s defines no stop conditions; add at least one stop condition with a halt range",
		[action_type],
	)
}

# ---------------------------------------------------------------------------
# verification_weakened: in prod, a proposal may replace its action type's verification
# only with one at least as strict (opsgate lists what makes it weaker in
# input.verification.weakened: signals or stop conditions removed or changed, a shorter
# hold, higher limits, ...), unless the proposer holds one of
# data.verification_override_roles.

default weakened_codes := []

weakened_codes := verification.weakened if is_array(verification.weakened)

default override_roles := []

override_roles := data.verification_override_roles if is_array(data.verification_override_roles)

deny contains violation("verification_weakened", msg) if {
	environment == "prod"
	count(weakened_codes) > 0
	not has_any_role(proposer_roles, override_roles)
	msg := sprintf(
		"the proposed verification is weaker than %s's default: %s; in prod only %s may weaken it",
		[action_type, list_text(weakened_codes), list_text(override_roles)],
	)
}

# ---------------------------------------------------------------------------
# change_freeze: data.freeze_windows [{name, start, end, environments, exempt_severities?}],
# half-open [start, end), "*" in environments matches every environment.

window_applies(w) if environment in object.get(w, "environments", [])

window_applies(w) if "*" in object.get(w, "environments", [])

window_exempt(w) if {
	is_string(incident.severity)
	incident.severity in object.get(w, "exempt_severities", [])
}

active_freezes contains w if {
	some w in freeze_windows
	window_applies(w)
	parse_time_ns(w.start) <= now_ns
	now_ns < parse_time_ns(w.end)
}

blocking_freezes contains w if {
	some w in active_freezes
	not window_exempt(w)
}

exempt_freeze_names contains w.name if {
	some w in active_freezes
	window_exempt(w)
}

exemption_text(w) := sprintf("only %s incidents are exempt", [list_text(w.exempt_severities)]) if {
	count(w.exempt_severities) > 0
} else := "no incident severity is exempt"

deny contains violation("change_freeze", msg) if {
	some w in blocking_freezes
	msg := sprintf(
		"%s is in change freeze %v from %v until %v and %s (this incident: %v); wait until the freeze ends",
		[environment, w.name, w.start, w.end, exemption_text(w), object.get(incident, "severity", null)],
	)
}

# A window for this environment without a start or end cannot be checked: deny.
deny contains violation("change_freeze", msg) if {
	some w in freeze_windows
	window_applies(w)
	not valid_window(w)
	msg := sprintf(
		"freeze window %v for %s has no valid start and end; fix freeze_windows in the policy data",
		[object.get(w, "name", null), environment],
	)
}

valid_window(w) if {
	is_string(w.start)
	is_string(w.end)
}

# Freeze windows exist but the time is unknown: cannot prove we are outside them.
deny contains violation("change_freeze", msg) if {
	count(freeze_windows) > 0
	not now_ns
	msg := "input.context has no usable now_ns or now, so freeze windows cannot be checked"
}

# The change_freeze precondition (computed outside the policy) also blocks, unless it
# names a window the policy already reports, or an active window this incident is exempt from.
deny contains violation("change_freeze", msg) if {
	p := precondition_named("change_freeze")
	not p.ok == true
	count(blocking_freezes) == 0
	not p.value in exempt_freeze_names
	msg := sprintf(
		"the change_freeze precondition reports a freeze for %s%s; wait for the freeze to end",
		[environment, precondition_detail(p)],
	)
}

# ---------------------------------------------------------------------------
# concurrent_action

deny contains violation("concurrent_action", msg) if {
	context.active_on_target > 0
	msg := sprintf(
		"%v other action(s) are active on %s in %s; wait for them to finish or cancel them",
		[context.active_on_target, target, environment],
	)
}

deny contains violation("concurrent_action", msg) if {
	not context.active_on_target > 0
	precondition_failed("concurrent_action")
	msg := sprintf(
		"the concurrent_action precondition reports another action on %s in %s%s; wait for it to finish",
		[target, environment, precondition_detail(precondition_named("concurrent_action"))],
	)
}

# ---------------------------------------------------------------------------
# Approvals: the max of the rules that apply, capped by data.max_required_approvals.

approval_counts contains 1

approval_counts contains 2 if risk in {"high", "critical"}

approval_counts contains 2 if irreversible

approval_counts contains 2 if {
	environment == "prod"
	incident.tier == "critical"
}

# Not max()/min(): rego-cpp orders numbers of different lengths as text (max([2, 10]) is 2).
wanted_approvals := 2 if 2 in approval_counts

else := 1

# Capped by data.max_required_approvals, and never below 1.
required_approvals := 1 if {
	max_required_approvals < 1
} else := max_required_approvals if {
	ladder_approvals > max_required_approvals
} else := ladder_approvals

# ---------------------------------------------------------------------------
# The trust ladder: a proposer earns or loses approvals by its track record
# (input.proposer.track_record, computed by opsgate from the store over a window; see
# the README, "The trust ladder"). Tunables in data.trust_ladder:
#   kinds                 who is on the ladder (shipped: agents only)
#   min_verified_passes   N: below N verified passes of a type, one approval more
#   trusted_pass_rate     at least N finished runs of the type here at this pass rate ...
#   trusted_risks         ... of a type this risky (and reversible) ...
#   trusted_environments  ... in one of these (never prod): one approval fewer
# A proposer whose last run of a type was rolled back (or whose rollback failed) may not
# propose or run that type (trust_revoked) until `opsgate trust reset` records a human
# lifting it. Required approvals never go below 1: opsgate runs nothing without a human.

default ladder_table := {}

ladder_table := data.trust_ladder if is_object(data.trust_ladder)

default ladder_kinds := ["agent"]

ladder_kinds := ladder_table.kinds if is_array(ladder_table.kinds)

default ladder_min_passes := 5

ladder_min_passes := ladder_table.min_verified_passes if is_number(ladder_table.min_verified_passes)

default ladder_pass_rate := 0.95

ladder_pass_rate := ladder_table.trusted_pass_rate if is_number(ladder_table.trusted_pass_rate)

default ladder_trusted_risks := ["low"]

ladder_trusted_risks := ladder_table.trusted_risks if is_array(ladder_table.trusted_risks)

default ladder_trusted_environments := ["dev", "staging"]

ladder_trusted_environments := ladder_table.trusted_environments if {
	is_array(ladder_table.trusted_environments)
}

on_ladder if object.get(proposer, "kind", "") in ladder_kinds

default track_record := {}

track_record := proposer.track_record if is_object(proposer.track_record)

record_scope(name) := track_record[name] if {
	is_object(track_record[name])
} else := {}

type_record := record_scope("action_type")

here_record := record_scope("action_type_in_environment")

figure(scope, name) := scope[name] if {
	is_number(scope[name])
} else := 0

type_passes := figure(type_record, "verified_passes")

here_finished := figure(here_record, "finished")

has_track_record if is_object(proposer.track_record)

# No record for a proposer on the ladder: its rung cannot be known, so deny. (`not` over
# a rule, not over a built-in call on a missing field: OPA and regopy agree on this.)
deny contains violation("track_record_unavailable", msg) if {
	on_ladder
	not has_track_record
	msg := sprintf(
		"no track record for %s in the input, so its place on the trust ladder is unknown",
		[proposer_id],
	)
}

revoking_run(last) if last.rolled_back == true

revoking_run(last) if last.rollback_failed == true

reset_since(last) if {
	is_number(track_record.trust_reset_ns)
	is_number(last.finished_ns)
	track_record.trust_reset_ns > last.finished_ns
}

default last_type_run := {}

last_type_run := type_record.last_run if is_object(type_record.last_run)

trust_revoked if {
	on_ladder
	revoking_run(last_type_run)
	not reset_since(last_type_run)
}

deny contains violation("trust_revoked", msg) if {
	trust_revoked
	msg := sprintf(
		"the last run of %s by %s (finished %v) was rolled back%s; it may not propose or run %s until someone with one of the roles %s resets its trust (opsgate trust reset)",
		[
			action_type, proposer_id, last_type_run.finished_at,
			rollback_failed_text(last_type_run), action_type, list_text(trust_reset_roles),
		],
	)
}

rollback_failed_text(last) := " and the rollback failed" if last.rollback_failed == true

else := ""

default trust_reset_roles := ["sre-lead"]

trust_reset_roles := data.trust_reset_roles if is_array(data.trust_reset_roles)

trusted_here if {
	environment != "prod"
	environment in ladder_trusted_environments
	risk in ladder_trusted_risks
	not irreversible
	here_finished >= ladder_min_passes
	is_number(here_record.pass_rate)
	here_record.pass_rate >= ladder_pass_rate
}

ladder_rung := "off" if {
	not on_ladder
} else := "revoked" if {
	trust_revoked
} else := "probation" if {
	type_passes < ladder_min_passes
} else := "trusted" if {
	trusted_here
} else := "standard"

ladder_approvals := wanted_approvals + 1 if {
	ladder_rung == "probation"
} else := wanted_approvals - 1 if {
	ladder_rung == "trusted"
	wanted_approvals > 1
} else := wanted_approvals

ladder_reason := "not on the trust ladder" if {
	ladder_rung == "off"
} else := sprintf("trust revoked for %s", [action_type]) if {
	ladder_rung == "revoked"
} else := sprintf(
	"probation: %v verified passes of %s, fewer than %v, so one approval more than a human needs",
	[type_passes, action_type, ladder_min_passes],
) if {
	ladder_rung == "probation"
} else := sprintf(
	"trusted: %v of %v finished runs of %s in %s passed verification (at least %v at %v needed), so one approval fewer, never below 1",
	[
		figure(here_record, "verified_passes"), here_finished, action_type,
		environment, ladder_min_passes, ladder_pass_rate,
	],
) if {
	ladder_rung == "trusted"
} else := sprintf(
	"standard: %v verified passes of %s, as many approvals as a human needs",
	[type_passes, action_type],
)

ladder := {
	"rung": ladder_rung,
	"human_approvals": wanted_approvals,
	"approvals": ladder_approvals,
	"reason": ladder_reason,
}

# ---------------------------------------------------------------------------
# decision

deny_list := [d | some d in deny]

decision := {
	"allow": count(deny) == 0,
	"deny": deny_list,
	"required_approvals": required_approvals,
	"approver_roles": approver_roles,
	"ladder": ladder,
}

# ---------------------------------------------------------------------------
# approval: may input.approver approve this action?

approver_id := object.get(approver, "id", "")

approver_kind := object.get(approver, "kind", "")

approver_roles_held := roles_of(approver_id)

approval_deny contains violation("insufficient_permissions", msg) if {
	approver_kind != "human"
	msg := sprintf(
		"approver %s is not a human (kind %s); only humans approve actions",
		[approver_id, approver_kind],
	)
}

approval_deny contains violation("insufficient_permissions", msg) if {
	not has_any_role(approver_roles_held, approver_roles)
	msg := sprintf(
		"approver %s has roles %s; approving in %s needs one of %s",
		[approver_id, list_text(approver_roles_held), environment, list_text(approver_roles)],
	)
}

approval_deny contains violation("self_approval", msg) if {
	approver_id == proposer_id
	msg := sprintf("%s proposed this action and cannot approve it; ask another approver", [approver_id])
}

approval := {
	"allow": count(approval_deny) == 0,
	"deny": [d | some d in approval_deny],
}

# ---------------------------------------------------------------------------
# authz: may input.principal perform input.verb on this action at all?
#
# Asked before every verb (propose, approve, reject, cancel, run, rollback, read, report),
# beside decision and approval, which still decide what they decide. `report` is a read
# across every action (reports, the audit trail, the workers list), asked with no action. Input: input.verb,
# input.principal {"id", "kind", "groups", "method"}, input.action {"id", "type",
# "target", "environment", "state"} and input.proposer (the action's proposer).
# A principal's roles are data.roles[id] plus the groups its credential carries.

authz_verbs := {
	"propose", "approve", "reject", "cancel", "run", "rollback", "read", "report",
	"trust_reset",
}

default principal := {}

principal := input.principal if is_object(input.principal)

principal_id := object.get(principal, "id", "")

principal_kind := object.get(principal, "kind", "")

default principal_groups := []

principal_groups := principal.groups if is_array(principal.groups)

principal_roles := {r | some r in roles_of(principal_id)} | {g | some g in principal_groups}

default verb := ""

verb := input.verb if is_string(input.verb)

default run_roles_table := {"default": ["sre", "sre-lead"]}

run_roles_table := data.run_roles if is_object(data.run_roles)

# Who may trigger `run` or a manual `rollback` in this environment.
run_roles := env_entry(run_roles_table)

is_proposer if {
	principal_id != ""
	principal_id == proposer_id
}

authz_deny contains violation("unknown_verb", msg) if {
	not verb in authz_verbs
	msg := sprintf("%v is not an opsgate verb", [input.verb])
}

authz_deny contains violation("unauthenticated", "no principal") if principal_id == ""

authz_deny contains violation("insufficient_permissions", msg) if {
	verb in {"approve", "reject", "run", "rollback", "trust_reset"}
	principal_kind != "human"
	msg := sprintf("%s is an agent (kind %s); only humans may %s", [principal_id, principal_kind, input.verb])
}

authz_deny contains violation("insufficient_permissions", msg) if {
	verb == "read"
	principal_kind != "human"
	not is_proposer
	msg := sprintf("agent %s reads only the actions it proposed", [principal_id])
}

authz_deny contains violation("insufficient_permissions", msg) if {
	verb == "cancel"
	not is_proposer
	not has_any_role(principal_roles, approver_roles)
	msg := sprintf(
		"only the proposer or an approver (%s in %s) may cancel; %s has roles %s",
		[list_text(approver_roles), environment, principal_id, list_text(principal_roles)],
	)
}

authz_deny contains violation("insufficient_permissions", msg) if {
	verb in {"run", "rollback"}
	not has_any_role(principal_roles, run_roles)
	msg := sprintf(
		"%s in %s needs one of the roles %s; %s has %s",
		[input.verb, environment, list_text(run_roles), principal_id, list_text(principal_roles)],
	)
}

default report_roles := ["governance", "sre", "sre-lead"]

# Who may read across every action: governance and approvers, never an agent (an agent
# reads only the actions it proposed).
report_roles := data.report_roles if is_array(data.report_roles)

authz_deny contains violation("insufficient_permissions", msg) if {
	verb == "report"
	principal_kind != "human"
	msg := sprintf("%s is an agent (kind %s); agents read only their own actions", [principal_id, principal_kind])
}

authz_deny contains violation("insufficient_permissions", msg) if {
	verb == "report"
	principal_kind == "human"
	not has_any_role(principal_roles, report_roles)
	msg := sprintf(
		"reports and the audit trail are for the roles %s; %s has %s",
		[list_text(report_roles), principal_id, list_text(principal_roles)],
	)
}

# `opsgate trust reset`: input.action.type is the action type, input.proposer the
# proposer whose trust is reset.
authz_deny contains violation("insufficient_permissions", msg) if {
	verb == "trust_reset"
	not has_any_role(principal_roles, trust_reset_roles)
	msg := sprintf(
		"resetting trust needs one of the roles %s; %s has %s",
		[list_text(trust_reset_roles), principal_id, list_text(principal_roles)],
	)
}

authz_deny contains violation("self_approval", msg) if {
	verb == "trust_reset"
	is_proposer
	msg := sprintf("%s cannot reset its own trust; ask someone else", [principal_id])
}

authz := {
	"allow": count(authz_deny) == 0,
	"deny": [d | some d in authz_deny],
}
