# Unit tests for the default opsgate policy. Run: `opsgate policy test --policies policies`.
#
# regopy 1.5.2 (rego-cpp) notes for test authors:
#   - `with input as {...}` breaks the whole module there: replace fields one by one
#     (`with input.action as ...`), which is what decide() / approve() below do;
#   - object.union is not recursive there (it is in OPA): use merge() below, which
#     replaces top-level keys only and behaves the same in both engines;
#   - no top-level commas in comprehension bodies (`[x | some i, x in xs]` fails to parse).
package opsgate_test

import rego.v1

# ---------------------------------------------------------------------------
# Fixtures

all_keys(a, b) := object.keys(a) | object.keys(b)

# Shallow merge: b's top-level keys replace a's.
merge(a, b) := {k: v | some k in all_keys(a, b); v := object.get(b, k, object.get(a, k, null))}

base_action := {
	"type": "scale_deployment",
	"target": "checkout",
	"environment": "prod",
	"params": {"deployment": "checkout", "replicas": 5},
	"risk": "medium",
	"reversible": true,
	"spec_hash": "sha256:0000",
	"reason": "p99 latency over SLO since 14:02",
}

alice := {"id": "alice", "kind": "human"}

bob := {"id": "bob", "kind": "human"}

carol := {"id": "carol", "kind": "human"}

dave := {"id": "dave", "kind": "human"}

sre_agent := {"id": "sre-agent", "kind": "agent"}

# Track records (input.proposer.track_record) for the trust ladder.
runs(passes, finished, rate) := {
	"proposals": finished,
	"blocked": 0,
	"blocked_by_code": {},
	"approved": finished,
	"rejected": 0,
	"executed": finished,
	"finished": finished,
	"verified_passes": passes,
	"failed_verifications": finished - passes,
	"stop_conditions": 0,
	"automatic_rollbacks": 0,
	"rollbacks_failed": 0,
	"pass_rate": rate,
	"seconds_since_last_failure": null,
	"last_run": null,
}

record(of_type, here) := {
	"window_days": 90,
	"since": "2026-08-25T10:00:00.000000+00:00",
	"overall": of_type,
	"action_type": of_type,
	"action_type_in_environment": here,
	"trust_reset_at": null,
	"trust_reset_ns": null,
}

agent_with(rec) := merge(sre_agent, {"track_record": rec})

novice_agent := agent_with(record(runs(0, 0, null), runs(0, 0, null)))

seasoned_agent := agent_with(record(runs(10, 10, 1), runs(10, 10, 1)))

# 2026-11-22T10:00:00+00:00, a day before base_context's now.
yesterday_ns := 1795341600000000000

last_run(rolled_back, rollback_failed) := {
	"finished_at": "2026-11-22T10:00:00.000000+00:00",
	"finished_ns": yesterday_ns,
	"failed_or_rolled_back": true,
	"rolled_back": rolled_back,
	"rollback_failed": rollback_failed,
}

# seasoned_agent whose last run of the type ended as given, reset at `reset_ns` (or null).
agent_after(last, reset_ns) := agent_with(merge(
	record(merge(runs(10, 11, 0.9), {"last_run": last}), runs(10, 11, 0.9)),
	{"trust_reset_ns": reset_ns},
))

in_staging(c) := merge(c, {"action": merge(c.action, {"environment": "staging", "risk": "low"})})

base_incident := {"id": "INC-42", "severity": "sev2", "class": "deploy-related", "tier": "standard"}

good_verification := {"defined": true, "signals": 1, "stop_conditions": 1}

base_preconditions := [
	{"name": "change_freeze", "ok": true, "value": null, "required": false},
	{"name": "concurrent_action", "ok": true, "value": 0, "required": false},
]

# 2026-11-23T10:00:00+00:00
now_ns := 1795428000000000000

base_context := {
	"now": "2026-11-23T10:00:00+00:00",
	"now_ns": now_ns,
	"phase": "propose",
	"active_on_target": 0,
}

base_case := {
	"action": base_action,
	"proposer": alice,
	"incident": base_incident,
	"verification": good_verification,
	"preconditions": base_preconditions,
	"context": base_context,
	"approver": bob,
}

# A case whose action differs from base_action in the given fields.
with_action(fields) := merge(base_case, {"action": merge(base_action, fields)})

# base_case with a different proposer.
proposed_by(who) := merge(base_case, {"proposer": who})

decide(c) := d if {
	d := data.opsgate.decision with input.action as c.action
		with input.proposer as c.proposer
		with input.incident as c.incident
		with input.verification as c.verification
		with input.preconditions as c.preconditions
		with input.context as c.context
}

approve(c) := a if {
	a := data.opsgate.approval with input.action as c.action
		with input.proposer as c.proposer
		with input.incident as c.incident
		with input.verification as c.verification
		with input.preconditions as c.preconditions
		with input.context as c.context
		with input.approver as c.approver
}

codes(d) := {x.code | some x in d.deny}

messages(d, code) := {x.message | some x in d.deny; x.code == code}

denied_with(c, code) if code in codes(decide(c))

# ---------------------------------------------------------------------------
# The decision document

test_allowed_prod_scale_needs_one_approval if {
	d := decide(base_case)
	d.allow == true
	d.deny == []
	d.required_approvals == 1
	d.approver_roles == ["sre-lead", "sre"]
}

test_decision_defined_for_empty_input if {
	# The runner's input is {}: every field missing must still give a (denying) decision.
	d := data.opsgate.decision
	d.allow == false
	codes(d) == {"not_allowlisted", "insufficient_permissions", "verification_undefined"}
	d.required_approvals == 2
}

test_decision_defined_without_bundle_data if {
	d := decide(base_case) with data.roles as null
		with data.allowlist as null
		with data.param_bounds as null
		with data.propose_roles as null
		with data.approver_roles as null
		with data.freeze_windows as null
		with data.max_required_approvals as null
	d.allow == false
	d.approver_roles == []
	d.required_approvals == 1
}

test_allow_is_false_whenever_deny_is_not_empty if {
	d := decide(with_action({"type": "drain_node"}))
	count(d.deny) > 0
	d.allow == false
}

test_deny_entries_have_code_and_message if {
	d := decide(merge(proposed_by(dave), {"verification": {"defined": false}}))
	count(d.deny) == 2
	every x in d.deny {
		is_string(x.code)
		is_string(x.message)
		count(x.message) > 20
	}
}

# ---------------------------------------------------------------------------
# not_allowlisted

test_not_allowlisted_drain_node_in_prod if {
	d := decide(with_action({"type": "drain_node", "params": {"node": "node-1"}}))
	messages(d, "not_allowlisted") == {concat("", [
		"action type drain_node is not allowlisted in prod; allowed there: ",
		"[\"restart_service\", \"scale_deployment\", \"rollback_deploy\", \"toggle_feature_flag\"]",
	])}
}

test_allowlisted_drain_node_in_staging if {
	c := with_action({"type": "drain_node", "environment": "staging", "params": {"node": "node-1"}})
	not denied_with(c, "not_allowlisted")
}

test_allowlisted_every_default_prod_type if {
	types := ["restart_service", "scale_deployment", "rollback_deploy", "toggle_feature_flag"]
	denied := {t | some t in types; denied_with(with_action({"type": t, "params": {}}), "not_allowlisted")}
	count(denied) == 0
}

test_not_allowlisted_unknown_environment if {
	d := decide(with_action({"environment": "qa"}))
	messages(d, "not_allowlisted") == {
		"environment qa has no allowlist in the policy bundle, so no action (scale_deployment) may run there",
	}
}

test_not_allowlisted_unknown_action_type if {
	denied_with(with_action({"type": "delete_database"}), "not_allowlisted")
}

# ---------------------------------------------------------------------------
# param_out_of_bounds

test_param_out_of_bounds_prod_max if {
	d := decide(with_action({"params": {"deployment": "checkout", "replicas": 500}}))
	d.allow == false
	messages(d, "param_out_of_bounds") == {"replicas=500 exceeds the prod bound of 50; propose replicas <= 50"}
}

test_param_just_above_prod_max_is_out_of_bounds if {
	denied_with(with_action({"params": {"deployment": "checkout", "replicas": 51}}), "param_out_of_bounds")
}

test_param_at_prod_max_is_within_bounds if {
	not denied_with(with_action({"params": {"deployment": "checkout", "replicas": 50}}), "param_out_of_bounds")
}

test_param_out_of_bounds_prod_min if {
	d := decide(with_action({"params": {"deployment": "checkout", "replicas": 0}}))
	messages(d, "param_out_of_bounds") == {"replicas=0 is below the prod minimum of 1; propose replicas >= 1"}
}

test_param_out_of_bounds_default_bound_in_staging if {
	d := decide(with_action({"environment": "staging", "params": {"deployment": "checkout", "replicas": 150}}))
	messages(d, "param_out_of_bounds") == {"replicas=150 exceeds the default bound of 100; propose replicas <= 100"}
}

test_param_within_default_bound_in_staging if {
	c := with_action({"environment": "staging", "params": {"deployment": "checkout", "replicas": 100}})
	not denied_with(c, "param_out_of_bounds")
}

test_param_zero_replicas_allowed_outside_prod if {
	c := with_action({"environment": "dev", "params": {"deployment": "checkout", "replicas": 0}})
	not denied_with(c, "param_out_of_bounds")
}

test_param_not_a_number_is_out_of_bounds if {
	d := decide(with_action({"params": {"deployment": "checkout", "replicas": "lots"}}))
	messages(d, "param_out_of_bounds") == {
		"replicas=lots is not a number, so the prod bounds for scale_deployment cannot be checked",
	}
}

test_param_bounds_only_for_their_action_type if {
	c := with_action({"type": "restart_service", "params": {"deployment": "checkout", "replicas": 500}})
	not denied_with(c, "param_out_of_bounds")
}

current_replicas(ok, value) := {"name": "current_replicas", "ok": ok, "value": value, "required": false}

with_current_replicas(c, ok, value) := merge(c, {"preconditions": array.concat(
	base_preconditions,
	[current_replicas(ok, value)],
)})

test_param_out_of_bounds_relative_to_current_replicas if {
	c := with_current_replicas(with_action({"params": {"deployment": "checkout", "replicas": 31}}), true, 10)
	d := decide(c)
	messages(d, "param_out_of_bounds") == {
		"replicas=31 is more than 3x the current 10 replicas in prod; propose replicas <= 30 and scale in steps",
	}
}

test_param_at_three_times_current_replicas_is_within_bounds if {
	c := with_current_replicas(with_action({"params": {"deployment": "checkout", "replicas": 30}}), true, 10)
	not denied_with(c, "param_out_of_bounds")
}

test_param_relative_bound_ignored_when_current_unknown if {
	c1 := with_current_replicas(with_action({"params": {"deployment": "checkout", "replicas": 40}}), false, 10)
	not denied_with(c1, "param_out_of_bounds")
	c2 := with_current_replicas(with_action({"params": {"deployment": "checkout", "replicas": 40}}), true, 0)
	not denied_with(c2, "param_out_of_bounds")
	c3 := with_current_replicas(with_action({"params": {"deployment": "checkout", "replicas": 40}}), true, null)
	not denied_with(c3, "param_out_of_bounds")
}

test_param_relative_bound_only_in_prod if {
	a := with_action({"environment": "staging", "params": {"deployment": "checkout", "replicas": 40}})
	not denied_with(with_current_replicas(a, true, 10), "param_out_of_bounds")
}

# ---------------------------------------------------------------------------
# missing_precondition

with_precondition(p) := merge(base_case, {"preconditions": array.concat(base_preconditions, [p])})

test_missing_precondition_required_and_failed if {
	p := {"name": "error_rate_elevated", "ok": false, "value": 0.001, "required": true}
	d := decide(with_precondition(p))
	d.allow == false
	messages(d, "missing_precondition") == {
		"required precondition error_rate_elevated is not met (value 0.001); wait until it holds or fix the check",
	}
}

test_missing_precondition_reports_check_error if {
	p := {"name": "error_rate_elevated", "ok": false, "value": null, "required": true, "error": "prometheus unreachable"}
	d := decide(with_precondition(p))
	messages(d, "missing_precondition") == {
		"required precondition error_rate_elevated is not met (prometheus unreachable); wait until it holds or fix the check",
	}
}

test_missing_precondition_without_ok_field if {
	denied_with(with_precondition({"name": "deploy_recent", "required": true}), "missing_precondition")
}

test_missing_precondition_required_and_ok if {
	p := {"name": "error_rate_elevated", "ok": true, "value": 0.31, "required": true}
	d := decide(with_precondition(p))
	d.allow == true
}

test_missing_precondition_not_required_and_failed if {
	p := {"name": "error_rate_elevated", "ok": false, "value": 0.001, "required": false}
	not denied_with(with_precondition(p), "missing_precondition")
}

test_missing_precondition_leaves_own_code_checks_to_their_codes if {
	p := {"name": "concurrent_action", "ok": false, "value": 1, "required": true}
	c := merge(base_case, {"preconditions": [p]})
	codes(decide(c)) == {"concurrent_action"}
}

# ---------------------------------------------------------------------------
# insufficient_permissions (proposing)

test_insufficient_permissions_developer_in_prod if {
	d := decide(proposed_by(dave))
	messages(d, "insufficient_permissions") == {
		"proposer dave has roles [\"developer\"]; proposing in prod needs one of [\"sre\", \"sre-lead\", \"agent\"]",
	}
}

test_developer_may_propose_in_staging if {
	c := merge(proposed_by(dave), {"action": merge(base_action, {"environment": "staging"})})
	d := decide(c)
	d.allow == true
}

test_insufficient_permissions_unknown_proposer if {
	denied_with(proposed_by({"id": "mallory", "kind": "human"}), "insufficient_permissions")
}

test_insufficient_permissions_roles_come_from_data if {
	d := decide(proposed_by(dave)) with data.roles as {"dave": ["sre"]}
	d.allow == true
}

test_agent_may_propose_reversible_in_prod if {
	d := decide(proposed_by(seasoned_agent))
	d.allow == true
}

test_insufficient_permissions_agent_critical_risk if {
	c := merge(proposed_by(sre_agent), {"action": merge(base_action, {"environment": "staging", "risk": "critical"})})
	d := decide(c)
	messages(d, "insufficient_permissions") == {
		"agent sre-agent may not propose scale_deployment: its risk is critical; a human must propose it",
	}
}

test_insufficient_permissions_agent_irreversible_in_prod if {
	c := merge(proposed_by(sre_agent), {"action": merge(base_action, {"reversible": false})})
	d := decide(c)
	messages(d, "insufficient_permissions") == {
		"agent sre-agent may not propose scale_deployment in prod: it is irreversible; a human must propose it",
	}
}

test_agent_may_propose_irreversible_in_staging if {
	c := merge(proposed_by(sre_agent), {"action": merge(base_action, {"environment": "staging", "reversible": false})})
	not denied_with(c, "insufficient_permissions")
}

test_human_may_propose_irreversible_critical_in_prod if {
	c := with_action({"risk": "critical", "reversible": false})
	not denied_with(c, "insufficient_permissions")
}

test_agent_drain_node_in_prod_is_not_allowlisted_and_not_permitted if {
	drain := {"type": "drain_node", "params": {"node": "node-1"}, "risk": "high", "reversible": false}
	c := merge(proposed_by(seasoned_agent), {"action": merge(base_action, drain)})
	codes(decide(c)) == {"not_allowlisted", "insufficient_permissions"}
}

# ---------------------------------------------------------------------------
# The trust ladder (data.trust_ladder; input.proposer.track_record)

test_ladder_agent_without_a_track_record_is_denied if {
	d := decide(proposed_by(sre_agent))
	d.allow == false
	messages(d, "track_record_unavailable") == {
		"no track record for sre-agent in the input, so its place on the trust ladder is unknown",
	}
}

test_ladder_probation_one_approval_more_than_a_human if {
	human := decide(base_case)
	d := decide(proposed_by(novice_agent))
	d.allow == true
	human.required_approvals == 1
	d.required_approvals == 2
	d.ladder.rung == "probation"
	d.ladder.human_approvals == 1
	d.ladder.reason == "probation: 0 verified passes of scale_deployment, fewer than 5, so one approval more than a human needs"
}

test_ladder_probation_until_n_verified_passes_of_the_type if {
	four := agent_with(record(runs(4, 4, 1), runs(4, 4, 1)))
	decide(proposed_by(four)).required_approvals == 2
	five := agent_with(record(runs(5, 5, 1), runs(5, 5, 1)))
	decide(proposed_by(five)).required_approvals == 1
	decide(proposed_by(five)).ladder.rung == "standard"
}

test_ladder_probation_is_capped_by_max_required_approvals if {
	c := merge(proposed_by(novice_agent), {"action": merge(base_action, {"risk": "high"})})
	decide(c).required_approvals == 3
	d := decide(c) with data.max_required_approvals as 2
	d.required_approvals == 2
}

test_ladder_standard_in_prod_however_good_the_record if {
	d := decide(proposed_by(seasoned_agent)) with data.trust_ladder.trusted_environments as ["prod", "staging"]
	d.ladder.rung == "standard"
	d.required_approvals == 1
}

test_ladder_trusted_in_staging_never_below_one if {
	d := decide(in_staging(proposed_by(seasoned_agent)))
	d.ladder.rung == "trusted"
	d.required_approvals == 1
	d.ladder.human_approvals == 1
}

test_ladder_trusted_one_fewer_where_a_human_needs_two if {
	c := merge(proposed_by(seasoned_agent), {"action": merge(base_action, {"environment": "staging", "risk": "high"})})
	human := decide(merge(c, {"proposer": alice})) with data.trust_ladder.trusted_risks as ["low", "high"]
	human.required_approvals == 2
	d := decide(c) with data.trust_ladder.trusted_risks as ["low", "high"]
	d.ladder.rung == "trusted"
	d.required_approvals == 1
}

test_ladder_trusted_needs_the_pass_rate if {
	patchy := agent_with(record(runs(9, 10, 0.9), runs(9, 10, 0.9)))
	d := decide(in_staging(proposed_by(patchy)))
	d.ladder.rung == "standard"
}

test_ladder_trusted_needs_n_finished_runs_here if {
	elsewhere := agent_with(record(runs(10, 10, 1), runs(3, 3, 1)))
	d := decide(in_staging(proposed_by(elsewhere)))
	d.ladder.rung == "standard"
}

test_ladder_trusted_needs_a_low_risk_reversible_type if {
	c := in_staging(proposed_by(seasoned_agent))
	decide(merge(c, {"action": merge(c.action, {"risk": "medium"})})).ladder.rung == "standard"
	decide(merge(c, {"action": merge(c.action, {"reversible": false})})).ladder.rung == "standard"
}

test_trust_revoked_after_a_rollback if {
	d := decide(proposed_by(agent_after(last_run(true, false), null)))
	d.allow == false
	d.ladder.rung == "revoked"
	messages(d, "trust_revoked") == {"the last run of scale_deployment by sre-agent (finished 2026-11-22T10:00:00.000000+00:00) was rolled back; it may not propose or run scale_deployment until someone with one of the roles [\"sre-lead\"] resets its trust (opsgate trust reset)"}
}

test_trust_revoked_after_a_failed_rollback if {
	d := decide(proposed_by(agent_after(last_run(true, true), null)))
	some m in messages(d, "trust_revoked")
	contains(m, "was rolled back and the rollback failed")
}

test_trust_not_revoked_by_a_failed_run_that_was_not_rolled_back if {
	d := decide(proposed_by(agent_after(last_run(false, false), null)))
	not "trust_revoked" in codes(d)
}

test_trust_reset_after_the_rollback_lifts_it if {
	d := decide(proposed_by(agent_after(last_run(true, false), yesterday_ns + 1)))
	d.allow == true
	d.ladder.rung == "standard"
}

test_trust_reset_before_the_rollback_does_not_lift_it if {
	d := decide(proposed_by(agent_after(last_run(true, false), yesterday_ns - 1)))
	"trust_revoked" in codes(d)
}

test_ladder_humans_are_off_it_in_the_shipped_bundle if {
	novice_human := merge(alice, {"track_record": novice_agent.track_record})
	d := decide(proposed_by(novice_human))
	d.required_approvals == 1
	d.ladder.rung == "off"
	reverted := merge(alice, {"track_record": agent_after(last_run(true, false), null).track_record})
	decide(proposed_by(reverted)).allow == true
}

test_ladder_humans_on_it_by_policy if {
	novice_human := merge(alice, {"track_record": novice_agent.track_record})
	d := decide(proposed_by(novice_human)) with data.trust_ladder.kinds as ["agent", "human"]
	d.required_approvals == 2
	d.ladder.rung == "probation"
}

# ---------------------------------------------------------------------------
# verification_undefined

with_verification(v) := merge(base_case, {"verification": v})

test_verification_undefined_not_defined if {
	d := decide(with_verification({"defined": false, "signals": 0, "stop_conditions": 0}))
	messages(d, "verification_undefined") == {
		"scale_deployment has no verification defined; add signals and stop conditions to its catalog entry",
	}
}

test_verification_undefined_no_signals if {
	d := decide(with_verification({"defined": true, "signals": 0, "stop_conditions": 1}))
	messages(d, "verification_undefined") == {
		"scale_deployment defines no verification signals; add at least one signal with a pass range",
	}
}

test_verification_undefined_no_stop_conditions if {
	d := decide(with_verification({"defined": true, "signals": 2, "stop_conditions": 0}))
	messages(d, "verification_undefined") == {
		"scale_deployment defines no stop conditions; add at least one stop condition with a halt range",
	}
}

# ---------------------------------------------------------------------------
# verification_weakened

in_env(c, env) := merge(c, {"action": merge(c.action, {"environment": env})})

weakened(codes) := {"defined": true, "signals": 1, "stop_conditions": 1, "custom": true, "weakened": codes}

test_verification_weakened_in_prod_by_an_sre if {
	d := decide(in_env(with_verification(weakened(["hold_shorter", "signal_removed"])), "prod"))
	messages(d, "verification_weakened") == {
		`the proposed verification is weaker than scale_deployment's default: ["hold_shorter", "signal_removed"]; in prod only ["sre-lead"] may weaken it`,
	}
}

test_verification_weakened_allowed_for_an_override_role if {
	c := in_env(with_verification(weakened(["hold_shorter"])), "prod")
	not denied_with(merge(c, {"proposer": {"id": "carol", "kind": "human"}}), "verification_weakened")
}

test_verification_weakened_only_in_prod if {
	not denied_with(in_env(with_verification(weakened(["hold_shorter"])), "staging"), "verification_weakened")
}

test_verification_stricter_custom_is_fine_in_prod if {
	not denied_with(in_env(with_verification(weakened([])), "prod"), "verification_weakened")
	v := {"defined": true, "signals": 1, "stop_conditions": 1, "custom": true}
	not denied_with(in_env(with_verification(v), "prod"), "verification_weakened")
}

test_verification_weakened_without_override_roles if {
	c := in_env(with_verification(weakened(["failure_limit_higher"])), "prod")
	d := decide(merge(c, {"proposer": {"id": "carol", "kind": "human"}})) with data.verification_override_roles as "nope"
	"verification_weakened" in codes(d)
}

test_verification_undefined_missing_fields if {
	denied_with(with_verification({}), "verification_undefined")
	denied_with(with_verification({"defined": true}), "verification_undefined")
	denied_with(with_verification({"defined": "yes", "signals": 1, "stop_conditions": 1}), "verification_undefined")
}

test_verification_defined if {
	not denied_with(with_verification({"defined": true, "signals": 3, "stop_conditions": 2}), "verification_undefined")
}

# ---------------------------------------------------------------------------
# change_freeze

black_friday := {
	"name": "black-friday",
	"start": "2026-11-23T00:00:00+00:00",
	"end": "2026-11-24T00:00:00+00:00",
	"environments": ["prod"],
}

# The same instant range, written with a +02:00 offset.
black_friday_cest := merge(black_friday, {
	"start": "2026-11-23T02:00:00+02:00",
	"end": "2026-11-24T02:00:00+02:00",
})

at(ns) := merge(base_case, {"context": merge(base_context, {"now_ns": ns})})

hour_ns := 3600000000000

test_change_freeze_inside_window if {
	d := decide(base_case) with data.freeze_windows as [black_friday]
	d.allow == false
	messages(d, "change_freeze") == {concat("", [
		"prod is in change freeze black-friday from 2026-11-23T00:00:00+00:00 until ",
		"2026-11-24T00:00:00+00:00 and no incident severity is exempt (this incident: sev2); ",
		"wait until the freeze ends",
	])}
}

test_change_freeze_message_names_exempt_severities if {
	exempt := merge(black_friday, {"exempt_severities": ["sev1"]})
	d := decide(base_case) with data.freeze_windows as [exempt]
	messages(d, "change_freeze") == {concat("", [
		"prod is in change freeze black-friday from 2026-11-23T00:00:00+00:00 until ",
		"2026-11-24T00:00:00+00:00 and only [\"sev1\"] incidents are exempt (this incident: sev2); ",
		"wait until the freeze ends",
	])}
}

test_change_freeze_window_without_start_or_end if {
	broken := object.remove(black_friday, ["end"])
	d := decide(base_case) with data.freeze_windows as [broken]
	messages(d, "change_freeze") == {
		"freeze window black-friday for prod has no valid start and end; fix freeze_windows in the policy data",
	}
	not denied_with(with_action({"environment": "staging"}), "change_freeze") with data.freeze_windows as [broken]
}

test_change_freeze_window_with_numeric_offset if {
	denied_with(base_case, "change_freeze") with data.freeze_windows as [black_friday_cest]
	not denied_with(at(now_ns + (14 * hour_ns)), "change_freeze") with data.freeze_windows as [black_friday_cest]
}

test_change_freeze_window_with_z_suffix if {
	zulu := merge(black_friday, {"start": "2026-11-23T00:00:00Z", "end": "2026-11-24T00:00:00Z"})
	denied_with(base_case, "change_freeze") with data.freeze_windows as [zulu]
}

test_change_freeze_starts_inclusive_ends_exclusive if {
	start := 1795392000000000000 # 2026-11-23T00:00:00+00:00
	denied_with(at(start), "change_freeze") with data.freeze_windows as [black_friday]
	not denied_with(at(start - 1), "change_freeze") with data.freeze_windows as [black_friday]
	denied_with(at((start + (24 * hour_ns)) - 1), "change_freeze") with data.freeze_windows as [black_friday]
	not denied_with(at(start + (24 * hour_ns)), "change_freeze") with data.freeze_windows as [black_friday]
}

test_change_freeze_outside_window if {
	d := decide(at(now_ns + (24 * hour_ns))) with data.freeze_windows as [black_friday]
	d.allow == true
}

test_change_freeze_other_environment if {
	d := decide(with_action({"environment": "staging"})) with data.freeze_windows as [black_friday]
	d.allow == true
}

test_change_freeze_wildcard_environment if {
	everywhere := merge(black_friday, {"environments": ["*"]})
	denied_with(with_action({"environment": "staging"}), "change_freeze") with data.freeze_windows as [everywhere]
}

test_change_freeze_exempt_severity if {
	exempt := merge(black_friday, {"exempt_severities": ["sev1"]})
	sev1 := merge(base_case, {"incident": merge(base_incident, {"severity": "sev1"})})
	d := decide(sev1) with data.freeze_windows as [exempt]
	d.allow == true
	denied_with(base_case, "change_freeze") with data.freeze_windows as [exempt]
}

test_change_freeze_exempt_severity_overrides_precondition_for_that_window if {
	exempt := merge(black_friday, {"exempt_severities": ["sev1"]})
	frozen := {"name": "change_freeze", "ok": false, "value": "black-friday", "required": false}
	sev1 := merge(base_case, {
		"incident": merge(base_incident, {"severity": "sev1"}),
		"preconditions": [frozen],
	})
	d := decide(sev1) with data.freeze_windows as [exempt]
	d.allow == true
}

test_change_freeze_null_severity_is_not_exempt if {
	exempt := merge(black_friday, {"exempt_severities": ["sev1"]})
	c := merge(base_case, {"incident": merge(base_incident, {"severity": null})})
	denied_with(c, "change_freeze") with data.freeze_windows as [exempt]
}

test_change_freeze_precondition_failed if {
	frozen := {"name": "change_freeze", "ok": false, "value": "release-week", "required": false}
	d := decide(merge(base_case, {"preconditions": [frozen]}))
	messages(d, "change_freeze") == {
		"the change_freeze precondition reports a freeze for prod (value release-week); wait for the freeze to end",
	}
}

test_change_freeze_reported_once_by_window_and_precondition if {
	frozen := {"name": "change_freeze", "ok": false, "value": "black-friday", "required": false}
	d := decide(merge(base_case, {"preconditions": [frozen]})) with data.freeze_windows as [black_friday]
	count(messages(d, "change_freeze")) == 1
}

test_change_freeze_precondition_ok if {
	not denied_with(base_case, "change_freeze")
}

test_change_freeze_uses_now_when_now_ns_missing if {
	c := merge(base_case, {"context": {"now": "2026-11-23T10:00:00+00:00", "active_on_target": 0}})
	denied_with(c, "change_freeze") with data.freeze_windows as [black_friday]
}

test_change_freeze_without_time_denies_when_windows_exist if {
	c := merge(base_case, {"context": {"active_on_target": 0}})
	denied_with(c, "change_freeze") with data.freeze_windows as [black_friday]
	not denied_with(c, "change_freeze")
}

# ---------------------------------------------------------------------------
# concurrent_action

test_concurrent_action_active_on_target if {
	c := merge(base_case, {"context": merge(base_context, {"active_on_target": 2})})
	d := decide(c)
	messages(d, "concurrent_action") == {
		"2 other action(s) are active on checkout in prod; wait for them to finish or cancel them",
	}
}

test_concurrent_action_precondition_failed if {
	busy := {"name": "concurrent_action", "ok": false, "value": 1, "required": false}
	d := decide(merge(base_case, {"preconditions": [busy]}))
	messages(d, "concurrent_action") == {
		"the concurrent_action precondition reports another action on checkout in prod (value 1); wait for it to finish",
	}
}

test_concurrent_action_reported_once if {
	busy := {"name": "concurrent_action", "ok": false, "value": 1, "required": false}
	c := merge(base_case, {"preconditions": [busy], "context": merge(base_context, {"active_on_target": 1})})
	count(messages(decide(c), "concurrent_action")) == 1
}

test_concurrent_action_none if {
	not denied_with(base_case, "concurrent_action")
}

# ---------------------------------------------------------------------------
# required_approvals and approver_roles

approvals(c) := decide(c).required_approvals

test_approvals_default_one if {
	approvals(base_case) == 1
	approvals(with_action({"risk": "low"})) == 1
}

test_approvals_high_risk_two if {
	approvals(with_action({"risk": "high"})) == 2
}

test_approvals_critical_risk_two if {
	approvals(with_action({"risk": "critical"})) == 2
}

test_approvals_irreversible_two if {
	approvals(with_action({"reversible": false})) == 2
}

test_approvals_missing_reversible_counts_as_irreversible if {
	approvals(merge(base_case, {"action": object.remove(base_action, ["reversible"])})) == 2
}

test_approvals_prod_critical_tier_two if {
	approvals(merge(base_case, {"incident": merge(base_incident, {"tier": "critical"})})) == 2
}

test_approvals_critical_tier_outside_prod_one if {
	c := merge(with_action({"environment": "staging"}), {"incident": merge(base_incident, {"tier": "critical"})})
	approvals(c) == 1
}

test_approvals_rules_take_the_max_not_the_sum if {
	c := merge(with_action({"risk": "critical", "reversible": false}), {"incident": merge(base_incident, {"tier": "critical"})})
	approvals(c) == 2
}

test_approvals_capped_by_max_required_approvals if {
	approvals(with_action({"risk": "high"})) == 1 with data.max_required_approvals as 1
}

test_approvals_never_below_one if {
	approvals(base_case) == 1 with data.max_required_approvals as 0
}

test_approver_roles_prod if {
	decide(base_case).approver_roles == ["sre-lead", "sre"]
}

test_approver_roles_fall_back_to_default if {
	decide(with_action({"environment": "staging"})).approver_roles == ["sre", "sre-lead"]
	decide(with_action({"environment": "qa"})).approver_roles == ["sre", "sre-lead"]
}

# ---------------------------------------------------------------------------
# approval

test_approval_allowed_for_sre if {
	a := approve(base_case)
	a.allow == true
	a.deny == []
}

test_approval_allowed_for_sre_lead if {
	approve(merge(base_case, {"approver": carol})).allow == true
}

test_approval_denied_for_agent if {
	a := approve(merge(base_case, {"approver": sre_agent}))
	a.allow == false
	{x.code | some x in a.deny} == {"insufficient_permissions"}
	{x.message | some x in a.deny} == {
		"approver sre-agent is not a human (kind agent); only humans approve actions",
		"approver sre-agent has roles [\"agent\"]; approving in prod needs one of [\"sre-lead\", \"sre\"]",
	}
}

test_approval_denied_for_agent_even_with_role if {
	a := approve(merge(base_case, {"approver": sre_agent})) with data.roles as {"sre-agent": ["sre"]}
	a.allow == false
	{x.message | some x in a.deny} == {"approver sre-agent is not a human (kind agent); only humans approve actions"}
}

test_approval_denied_missing_role if {
	a := approve(merge(base_case, {"approver": dave}))
	a.allow == false
	{x.message | some x in a.deny} == {
		"approver dave has roles [\"developer\"]; approving in prod needs one of [\"sre-lead\", \"sre\"]",
	}
}

test_approval_denied_self_approval if {
	a := approve(merge(base_case, {"approver": alice}))
	a.allow == false
	{x.code | some x in a.deny} == {"self_approval"}
	{x.message | some x in a.deny} == {"alice proposed this action and cannot approve it; ask another approver"}
}

test_approval_denied_without_approver if {
	a := approve(merge(base_case, {"approver": null}))
	a.allow == false
	"insufficient_permissions" in {x.code | some x in a.deny}
}

test_approval_uses_environment_approver_roles if {
	c := merge(with_action({"environment": "staging"}), {"approver": bob})
	approve(c).allow == true with data.approver_roles as {"default": ["sre-lead"]}
		with data.roles as {"bob": ["sre-lead"]}
	approve(c).allow == false with data.approver_roles as {"default": ["sre-lead"]}
}

# ---------------------------------------------------------------------------
# Every builtin the policy (and these tests) use, as this engine evaluates it.

test_builtin_time_parse_rfc3339_ns_utc_offset if {
	time.parse_rfc3339_ns("2026-11-23T10:00:00+00:00") == 1795428000000000000
}

test_builtin_time_parse_rfc3339_ns_other_offset if {
	time.parse_rfc3339_ns("2026-11-23T12:00:00+02:00") == 1795428000000000000
	time.parse_rfc3339_ns("2026-11-23T05:00:00-05:00") == 1795428000000000000
}

test_builtin_time_parse_rfc3339_ns_fractional_seconds if {
	time.parse_rfc3339_ns("2026-11-23T10:00:00.123456+00:00") == 1795428000123456000
}

test_builtin_object_get if {
	object.get({"a": 1}, "a", 0) == 1
	object.get({"a": 1}, "b", 0) == 0
	object.get({"a": {"b": 2}}, "a", {}) == {"b": 2}
}

test_builtin_object_keys if {
	object.keys({"a": 1, "b": 2}) == {"a", "b"}
}

test_builtin_object_remove if {
	object.remove({"a": 1, "b": 2}, ["b"]) == {"a": 1}
}

test_builtin_array_concat if {
	array.concat([1], [2, 3]) == [1, 2, 3]
}

test_builtin_sprintf if {
	sprintf("%s=%v exceeds %v", ["replicas", 500, 50]) == "replicas=500 exceeds 50"
	sprintf("%v", [0.001]) == "0.001"
	sprintf("%v", [["a", "b"]]) == "[\"a\", \"b\"]"
	sprintf("%v", [[]]) == "[]"
	sprintf("%v", [null]) == "null"
	sprintf("(%v)", [sprintf("%v", [1])]) == "(1)"
}

test_builtin_count if {
	count([1, 2]) == 2
	count({"a"}) == 1
	count({}) == 0
	count("abc") == 3
}

test_builtin_type_checks if {
	is_number(1)
	is_number(1.5)
	not is_number("1")
	is_object({})
	not is_object([])
	is_array([])
	not is_array({})
	is_string("")
	not is_string(1)
}

test_builtin_concat_endswith_trim_suffix if {
	endswith("2026-11-23T00:00:00Z", "Z")
	not endswith("2026-11-23T00:00:00+00:00", "Z")
	trim_suffix("2026-11-23T00:00:00Z", "Z") == "2026-11-23T00:00:00"
	concat("", ["2026-11-23T00:00:00", "+00:00"]) == "2026-11-23T00:00:00+00:00"
	time.parse_rfc3339_ns(concat("", [trim_suffix("2026-11-23T00:00:00Z", "Z"), "+00:00"])) == 1795392000000000000
}

# ---------------------------------------------------------------------------
# authz: every verb, by principal

authz(verb, who, proposer) := a if {
	a := data.opsgate.authz with input.verb as verb
		with input.principal as who
		with input.action as base_action
		with input.proposer as proposer
}

authz_codes(verb, who, proposer) := {d.code | some d in authz(verb, who, proposer).deny}

grouped(who, groups) := merge(who, {"groups": groups})

test_authz_humans_may_do_every_verb_with_the_roles if {
	every verb in ["propose", "approve", "reject", "cancel", "run", "rollback", "read"] {
		authz(verb, alice, bob).allow
	}
}

test_authz_agents_never_approve_reject_run_or_rollback if {
	every verb in ["approve", "reject", "run", "rollback"] {
		authz_codes(verb, sre_agent, bob) == {"insufficient_permissions"}
	}
}

test_authz_agents_propose if {
	authz("propose", sre_agent, sre_agent).allow
}

test_authz_agents_read_only_their_own_actions if {
	authz("read", sre_agent, sre_agent).allow
	authz_codes("read", sre_agent, bob) == {"insufficient_permissions"}
	authz("read", dave, bob).allow
}

test_authz_cancel_only_by_the_proposer_or_an_approver if {
	authz("cancel", dave, dave).allow
	authz("cancel", sre_agent, sre_agent).allow
	authz("cancel", alice, dave).allow
	authz_codes("cancel", dave, alice) == {"insufficient_permissions"}
	authz_codes("cancel", sre_agent, alice) == {"insufficient_permissions"}
}

test_authz_run_and_rollback_need_a_run_role if {
	authz("run", carol, bob).allow
	authz_codes("run", dave, bob) == {"insufficient_permissions"}
	authz_codes("rollback", dave, bob) == {"insufficient_permissions"}
	authz_codes("rollback", {"id": "mallory", "kind": "human"}, bob) == {"insufficient_permissions"}
}

test_authz_groups_from_the_credential_count_as_roles if {
	authz("rollback", grouped({"id": "erin", "kind": "human"}, ["sre"]), bob).allow
	authz_codes("rollback", grouped({"id": "erin", "kind": "human"}, ["dev"]), bob) == {"insufficient_permissions"}
}

test_authz_unknown_verb_or_no_principal_denies if {
	authz_codes("drop", alice, bob) == {"unknown_verb"}
	"unauthenticated" in authz_codes("read", {}, bob)
	not authz("read", {}, bob).allow
}

test_authz_run_roles_from_data if {
	# Under `with data.X`, rego-cpp loses inputs taken from this package's rules: literals.
	a := data.opsgate.authz with input.verb as "run"
		with input.principal as {"id": "dave", "kind": "human"}
		with input.action as {"type": "scale_deployment", "environment": "prod"}
		with input.proposer as {"id": "bob", "kind": "human"}
		with data.run_roles as {"prod": ["developer"]}
	a.allow
	b := data.opsgate.authz with input.verb as "run"
		with input.principal as {"id": "alice", "kind": "human"}
		with input.action as {"type": "scale_deployment", "environment": "prod"}
		with input.proposer as {"id": "bob", "kind": "human"}
		with data.run_roles as {"prod": ["developer"]}
	not b.allow
}

test_authz_reports_for_governance_and_approvers_only if {
	authz("report", alice, {}).allow
	authz("report", carol, {}).allow
	authz("report", grouped({"id": "gina", "kind": "human"}, ["governance"]), {}).allow
	authz_codes("report", dave, {}) == {"insufficient_permissions"}
	authz_codes("report", sre_agent, {}) == {"insufficient_permissions"}
	# a group on an agent's credential does not make it a reader of everything
	authz_codes("report", grouped(sre_agent, ["governance"]), {}) == {"insufficient_permissions"}
}

test_authz_report_roles_from_data if {
	a := data.opsgate.authz with input.verb as "report"
		with input.principal as {"id": "dave", "kind": "human"}
		with input.action as {}
		with input.proposer as {}
		with data.report_roles as ["developer"]
	a.allow
	b := data.opsgate.authz with input.verb as "report"
		with input.principal as {"id": "alice", "kind": "human"}
		with input.action as {}
		with input.proposer as {}
		with data.report_roles as ["developer"]
	not b.allow
}

test_authz_trust_reset_needs_a_reset_role if {
	authz("trust_reset", carol, sre_agent).allow
	authz_codes("trust_reset", alice, sre_agent) == {"insufficient_permissions"}
	some m in {d.message | some d in authz("trust_reset", alice, sre_agent).deny}
	m == "resetting trust needs one of the roles [\"sre-lead\"]; alice has [\"sre\"]"
	authz("trust_reset", alice, sre_agent).allow with data.trust_reset_roles as ["sre"]
}

test_authz_trust_reset_never_by_an_agent_nor_by_its_subject if {
	authz_codes("trust_reset", grouped(sre_agent, ["sre-lead"]), alice) == {"insufficient_permissions"}
	authz_codes("trust_reset", carol, carol) == {"self_approval"}
}
