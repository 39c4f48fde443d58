from helpers import UNIT_ROUNDOFF, assert_informative, float32_bound  # noqa: F401  (only for test_lrp, test_lrp_rules, test_refactor_maps until they import helpers)
