module go_agent

go 1.19
