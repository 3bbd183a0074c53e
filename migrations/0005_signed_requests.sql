-- Trust that does not depend on the registry: the researcher's signed request is kept with
-- its task (a job's with the job and each of its rounds' tasks) and relayed to the stations;
-- each sealed output keeps its station's signature. Same portability rules as 0001.

ALTER TABLE tasks ADD COLUMN statement TEXT;
ALTER TABLE jobs ADD COLUMN statement TEXT;
ALTER TABLE results ADD COLUMN signature TEXT;
