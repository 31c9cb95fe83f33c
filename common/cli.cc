#include "common/cli.h"

#include <algorithm>
#include <cstdint>
#include <iostream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace icecache::cli {

void Configure(CLI::App& app) {
  app.option_defaults()->always_capture_default();
  app.fallthrough();
  app.get_formatter()->column_width(30);
}

const CLI::Validator& Positive() {
  static const CLI::Validator* const kPositive = new CLI::Validator(
      [](std::string& value) -> std::string {
        int64_t v = 0;
        if (absl::SimpleAtoi(value, &v) && v >= 1) return "";
        return absl::StrCat("'", value, "' is not a positive integer");
      },
      "POSITIVE");
  return *kPositive;
}

std::optional<int> Parse(CLI::App& app, int argc, char** argv) {
  try {
    app.parse(argc, argv);
    return std::nullopt;
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::cerr << app.get_name() << ": " << e.what() << "\n(run " << app.get_name()
              << " --help for usage)\n";
    return kExitUsage;
  }
}

absl::Status ParseArgs(CLI::App& app, std::vector<std::string> args) {
  std::reverse(args.begin(), args.end());  // CLI11 takes the vector back to front
  try {
    app.parse(args);
  } catch (const CLI::ParseError& e) {
    return absl::InvalidArgumentError(e.what());
  }
  return absl::OkStatus();
}

}  // namespace icecache::cli
