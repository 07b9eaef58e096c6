"""Mean and standard deviation of one OMOP CDM measurement by gender, over SQL nodes.

Every node keeps its patients in its own OMOP CDM database (PostgreSQL). `analyze` asks it,
read-only, for per-gender counts and sums of the measurement's values (NULL values are not
counted); only those few numbers leave the node. `aggregate` pools them into the exact mean
and standard deviation, the same numbers one SQL query over all nodes' rows would give.

Run parameters: `--param concept=3004249` (the measurement's concept id; default systolic
blood pressure), `--param source=omop` (the configured SQL source's name).
"""

import math

import flame

GENDERS = {8507: "male", 8532: "female"}

QUERY = """
    select p.gender_concept_id as gender,
           count(m.value_as_number) as n,
           sum(m.value_as_number) as total,
           sum(m.value_as_number * m.value_as_number) as total_sq
    from measurement m
    join person p on p.person_id = m.person_id
    where m.measurement_concept_id = %s and m.value_as_number is not null
    group by p.gender_concept_id
"""


def analyze(data):
    params = flame.context().params
    concept = int(params.get("concept", 3004249))
    table = data.source(str(params.get("source", "omop"))).query(QUERY, [concept])
    return {  # keyed by gender concept id (int keys travel as ints)
        int(row["gender"]): {"n": int(row["n"]), "sum": row["total"], "sum_sq": row["total_sq"]}
        for row in table.to_pylist()
    }


def aggregate(results):
    pooled = {}
    for per_gender in results.values():
        for gender, part in per_gender.items():
            total = pooled.setdefault(gender, {"n": 0, "sum": 0.0, "sum_sq": 0.0})
            for key in total:
                total[key] += part[key]
    summary = {}
    for gender, total in sorted(pooled.items()):
        n = total["n"]
        mean = total["sum"] / n
        variance = (total["sum_sq"] - n * mean * mean) / (n - 1) if n > 1 else 0.0
        summary[GENDERS.get(gender, str(gender))] = {
            "n": n,
            "mean": mean,
            "std": math.sqrt(max(variance, 0.0)),
        }
    return summary
