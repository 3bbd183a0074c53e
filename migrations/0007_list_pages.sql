-- Lists that grow with use are paged by the database in the order they are listed
-- (`Db::keyset`): these indexes let a page start at its cursor instead of reading the list.
-- Same portability rules as 0001.

CREATE INDEX trains_by_created ON trains (created_ms, digest);
CREATE INDEX tasks_by_created ON tasks (created_ms, id);
CREATE INDEX tasks_by_researcher ON tasks (researcher, created_ms, id);
CREATE INDEX jobs_by_created ON jobs (created_ms, id);
CREATE INDEX jobs_by_researcher ON jobs (researcher, created_ms, id);
CREATE INDEX runs_by_station_updated ON runs (station, updated_ms, id);
