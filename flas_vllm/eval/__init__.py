"""AxBench-style evaluation: resumable bulk generation, the judge, the scorer, Ray sharding, the offline lexical judge."""
