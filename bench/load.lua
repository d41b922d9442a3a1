-- wrk script used by run.py: GETs over a rotation of path templates, each
-- "{id}" replaced by a random id from first, first + step, ..., <= last.
--
--   wrk -t1 ... -s load.lua URL -- STOP_AFTER MARKER FIRST LAST STEP PATH...
--
-- With STOP_AFTER > 0 the thread stops after that many responses and creates
-- the file MARKER: wrk's main thread only wakes up at the end of -d or on
-- SIGINT, so run.py waits for the marker and then interrupts wrk. That gives
-- request counts rather than durations (the RSS check needs "after 1,000
-- requests"). Counting needs one thread (-t1): each thread has its own state.

local stop_after, marker, first, slots, step
local paths = {}
local turn, responses = 0, 0

function init(args)
   stop_after = tonumber(args[1])
   marker = args[2]
   first, step = tonumber(args[3]), tonumber(args[5])
   slots = math.floor((tonumber(args[4]) - first) / step)
   for i = 6, #args do
      paths[#paths + 1] = args[i]
   end
   -- The same id sequence on every run, so runs are comparable.
   math.randomseed(42)
   if stop_after > 0 then
      -- Defined only when needed: wrk buffers every response for Lua once
      -- a response() function exists.
      response = function()
         responses = responses + 1
         if responses == stop_after then
            io.open(marker, "w"):close()
            wrk.thread:stop()
         end
      end
   end
end

function request()
   turn = turn % #paths + 1
   local id = first + step * math.random(0, slots)
   return wrk.format("GET", (paths[turn]:gsub("{id}", tostring(id))))
end
