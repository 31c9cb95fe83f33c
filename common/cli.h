// The command-line conventions every IceCache tool shares, on CLI11:
// kebab-case flags (`--page-tokens`; old snake_case spellings stay as
// aliases), `--help` that shows each flag's default, and a bad command line
// that exits with kExitUsage and a message naming the flag. See README
// ("Command lines").
//
// Not thread-safe: a tool builds and parses its CLI::App on one thread.
#ifndef ICECACHE_COMMON_CLI_H_
#define ICECACHE_COMMON_CLI_H_

#include <CLI/CLI.hpp>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"

namespace icecache::cli {

// Exit status of every tool for a bad command line.
inline constexpr int kExitUsage = 2;

// Applies the shared settings to a new app. Call before adding subcommands:
// they inherit them (flags of the parent are accepted after a subcommand).
void Configure(CLI::App& app);

// Integers >= 1; the message names the value given.
const CLI::Validator& Positive();

// Parses argv. nullopt: the command line is good, the tool goes on.
// Otherwise the tool exits with the returned code: 0 after printing the help
// asked for with --help; kExitUsage after printing
// "<tool>: <what is wrong>" and a pointer to --help on stderr.
std::optional<int> Parse(CLI::App& app, int argc, char** argv);

// Parses `args` (in command-line order, without the program name) for code
// that reports errors as a status, such as tests of a tool's flags.
// InvalidArgument with CLI11's message (which names the flag) on a bad
// command line, including --help.
absl::Status ParseArgs(CLI::App& app, std::vector<std::string> args);

}  // namespace icecache::cli

#endif  // ICECACHE_COMMON_CLI_H_
