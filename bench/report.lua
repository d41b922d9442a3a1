-- wrk script used by retries.py: PUT /jobs/{id}/status over a list of RUNNING
-- jobs, each reported RUNNING again (a worker repeating its report: the whole
-- guard statement, no write), with or without the worker's node_id and attempt.
--
--   wrk -t1 ... -s report.lua URL -- JOBS_FILE FENCED
--
-- JOBS_FILE: one job a line, "id node_id attempt"; FENCED: 1 names them.

local jobs = {}
local fenced
local turn = 0

function init(args)
   for line in io.lines(args[1]) do
      local id, node, attempt = line:match("^(%d+) (%S+) (%d+)$")
      jobs[#jobs + 1] = {id, node, attempt}
   end
   fenced = args[2] == "1"
end

function request()
   turn = turn % #jobs + 1
   local job = jobs[turn]
   local body = '{"status": "RUNNING"}'
   if fenced then
      body = string.format('{"status": "RUNNING", "node_id": "%s", "attempt": %s}', job[2], job[3])
   end
   return wrk.format("PUT", "/jobs/" .. job[1] .. "/status",
                     {["Content-Type"] = "application/json"}, body)
end
