//! The stated UI vocabulary (issue 6 point 4): every word of every window title, dialog title,
//! button label, menu and checkbox label that [`crate::screens`] draws in the training split is
//! one of [`ui_words`] (at least 300 distinct words; the list is also written out, one word a
//! line, to `train/assets/data/ui_vocabulary.txt`, and a test keeps the two equal). Field
//! contents, list items and dialog messages are free text (names, cities, file names, numbers,
//! sentences).
//!
//! Titles and labels are composed from the word classes below with small templates
//! ([`title`], [`button_labels`], [`checkbox_label`]).
//!
//! # Held-out words
//!
//! A second, separate list, [`held_out_words`] ([`HELD_OUT_ACTIONS`] and [`HELD_OUT_OBJECTS`],
//! 155 ordinary English verbs and nouns; written out to
//! `train/assets/data/held_out_vocabulary.txt`, kept equal by a test), is used by held-out
//! screenshots only, so that an evaluation can tell reading from remembering: about a third
//! ([`HELD_OUT_TITLE_FRACTION`]) of held-out screens get a title made by [`held_out_title`]
//! and about a third ([`HELD_OUT_BUTTON_FRACTION`]) of the button labels of held-out screens
//! are made by [`held_out_button_label`]; each of those holds at least one held-out word, next
//! to UI-vocabulary words. No held-out word is in [`ui_words`] or in any other text that
//! training samples draw (names, cities, countries, file names, messages, captions, questions),
//! nor is it a case variant or plural of one; tests check the lists and thousands of generated
//! training screens. [`has_held_out_word`] tells whether a text holds one (what flags a
//! question's [`crate::Qa::unseen`]).

use std::collections::BTreeSet;
use std::sync::LazyLock;

use rand::seq::IndexedRandom;
use rand::Rng;

/// Verbs of buttons and commands.
pub const ACTIONS: &[&str] = &[
    "Abort",
    "Accept",
    "Activate",
    "Add",
    "Agree",
    "Allow",
    "Apply",
    "Approve",
    "Archive",
    "Assign",
    "Attach",
    "Authorize",
    "Back",
    "Block",
    "Browse",
    "Build",
    "Buy",
    "Calculate",
    "Call",
    "Cancel",
    "Change",
    "Check",
    "Choose",
    "Clean",
    "Clear",
    "Close",
    "Collapse",
    "Compare",
    "Compile",
    "Compose",
    "Configure",
    "Confirm",
    "Connect",
    "Continue",
    "Convert",
    "Copy",
    "Create",
    "Crop",
    "Customize",
    "Cut",
    "Debug",
    "Decline",
    "Delete",
    "Deny",
    "Deploy",
    "Disable",
    "Disconnect",
    "Dismiss",
    "Done",
    "Download",
    "Duplicate",
    "Edit",
    "Eject",
    "Enable",
    "Encrypt",
    "Enter",
    "Erase",
    "Exit",
    "Expand",
    "Export",
    "Extract",
    "Filter",
    "Find",
    "Finish",
    "Fix",
    "Format",
    "Forward",
    "Generate",
    "Hide",
    "Ignore",
    "Import",
    "Insert",
    "Install",
    "Invite",
    "Join",
    "Keep",
    "Launch",
    "Learn",
    "Leave",
    "Load",
    "Lock",
    "Log",
    "Manage",
    "Mark",
    "Merge",
    "Minimize",
    "Move",
    "Mute",
    "Next",
    "Open",
    "Order",
    "Pause",
    "Paste",
    "Pay",
    "Pin",
    "Play",
    "Preview",
    "Print",
    "Proceed",
    "Publish",
    "Quit",
    "Rate",
    "Read",
    "Record",
    "Redo",
    "Refresh",
    "Register",
    "Reload",
    "Remind",
    "Remove",
    "Rename",
    "Repair",
    "Replace",
    "Reply",
    "Report",
    "Request",
    "Reset",
    "Resize",
    "Restart",
    "Restore",
    "Resume",
    "Retry",
    "Return",
    "Review",
    "Rotate",
    "Run",
    "Save",
    "Scan",
    "Schedule",
    "Search",
    "Select",
    "Send",
    "Set",
    "Share",
    "Show",
    "Shuffle",
    "Sign",
    "Skip",
    "Sort",
    "Start",
    "Stop",
    "Submit",
    "Subscribe",
    "Switch",
    "Sync",
    "Test",
    "Translate",
    "Try",
    "Undo",
    "Uninstall",
    "Unlock",
    "Update",
    "Upgrade",
    "Upload",
    "Verify",
    "View",
    "Zoom",
];

/// Nouns: things a window is about.
pub const OBJECTS: &[&str] = &[
    "Accessibility",
    "Account",
    "Accounts",
    "Activity",
    "Address",
    "Alarm",
    "Album",
    "Alert",
    "Appearance",
    "Application",
    "Appointment",
    "Archive",
    "Attachment",
    "Audio",
    "Backup",
    "Balance",
    "Bank",
    "Battery",
    "Bluetooth",
    "Board",
    "Book",
    "Bookmarks",
    "Branch",
    "Brightness",
    "Browser",
    "Budget",
    "Bug",
    "Cache",
    "Calendar",
    "Camera",
    "Card",
    "Cart",
    "Category",
    "Certificate",
    "Channel",
    "Chapter",
    "Chart",
    "Chat",
    "Checkout",
    "Clipboard",
    "Clock",
    "Cloud",
    "Color",
    "Comment",
    "Commit",
    "Company",
    "Computer",
    "Connection",
    "Console",
    "Contact",
    "Contacts",
    "Content",
    "Cookies",
    "Country",
    "Customer",
    "Dashboard",
    "Data",
    "Database",
    "Date",
    "Delivery",
    "Desktop",
    "Device",
    "Devices",
    "Dictionary",
    "Directory",
    "Disk",
    "Display",
    "Document",
    "Documents",
    "Domain",
    "Download",
    "Downloads",
    "Draft",
    "Drafts",
    "Drive",
    "Driver",
    "Email",
    "Employee",
    "Energy",
    "Event",
    "Events",
    "Expense",
    "Extension",
    "Extensions",
    "Favorites",
    "Feedback",
    "Field",
    "File",
    "Files",
    "Firewall",
    "Folder",
    "Folders",
    "Font",
    "Fonts",
    "Form",
    "Gallery",
    "Game",
    "Graph",
    "Group",
    "Groups",
    "Hardware",
    "Help",
    "History",
    "Home",
    "Host",
    "Icon",
    "Image",
    "Images",
    "Inbox",
    "Income",
    "Input",
    "Inventory",
    "Invoice",
    "Issue",
    "Item",
    "Items",
    "Job",
    "Keyboard",
    "Label",
    "Language",
    "Layer",
    "Layout",
    "Library",
    "License",
    "Link",
    "Location",
    "Log",
    "Login",
    "Mail",
    "Map",
    "Media",
    "Meeting",
    "Member",
    "Members",
    "Memory",
    "Menu",
    "Message",
    "Messages",
    "Microphone",
    "Monitor",
    "Mouse",
    "Movie",
    "Music",
    "Name",
    "Network",
    "Note",
    "Notes",
    "Notification",
    "Notifications",
    "Order",
    "Orders",
    "Output",
    "Package",
    "Page",
    "Pages",
    "Password",
    "Path",
    "Payment",
    "Payroll",
    "Permissions",
    "Phone",
    "Photo",
    "Photos",
    "Picture",
    "Playlist",
    "Plugin",
    "Plugins",
    "Port",
    "Power",
    "Printer",
    "Privacy",
    "Process",
    "Product",
    "Products",
    "Profile",
    "Project",
    "Projects",
    "Proxy",
    "Query",
    "Queue",
    "Range",
    "Recording",
    "Region",
    "Release",
    "Reminder",
    "Reminders",
    "Repository",
    "Request",
    "Role",
    "Room",
    "Router",
    "Rule",
    "Rules",
    "Scanner",
    "Screen",
    "Script",
    "Security",
    "Server",
    "Service",
    "Services",
    "Session",
    "Share",
    "Sheet",
    "Shipping",
    "Shortcut",
    "Shortcuts",
    "Signature",
    "Size",
    "Slide",
    "Software",
    "Song",
    "Songs",
    "Sound",
    "Source",
    "Spelling",
    "Sprint",
    "Startup",
    "Status",
    "Storage",
    "Store",
    "Style",
    "Styles",
    "Subscription",
    "Summary",
    "Supplier",
    "Support",
    "System",
    "Tab",
    "Table",
    "Tag",
    "Tags",
    "Task",
    "Tasks",
    "Team",
    "Template",
    "Templates",
    "Terminal",
    "Text",
    "Theme",
    "Ticket",
    "Tickets",
    "Time",
    "Timer",
    "Toolbar",
    "Tools",
    "Track",
    "Transfer",
    "Trash",
    "Update",
    "Updates",
    "User",
    "Users",
    "Version",
    "Video",
    "Videos",
    "Volume",
    "Wallet",
    "Wallpaper",
    "Warehouse",
    "Weather",
    "Website",
    "Widget",
    "Window",
    "Wireless",
    "Workspace",
];

/// Nouns that name a kind of window (the last word of many titles).
pub const PANELS: &[&str] = &[
    "Assistant",
    "Browser",
    "Center",
    "Details",
    "Editor",
    "Explorer",
    "Info",
    "Inspector",
    "Manager",
    "Monitor",
    "Options",
    "Overview",
    "Panel",
    "Preferences",
    "Properties",
    "Settings",
    "Setup",
    "Viewer",
    "Wizard",
];

/// Adjectives and other modifiers.
pub const MODIFIERS: &[&str] = &[
    "Active",
    "Advanced",
    "All",
    "Archived",
    "Auto",
    "Basic",
    "Blocked",
    "Completed",
    "Current",
    "Custom",
    "Daily",
    "Dark",
    "Default",
    "Deleted",
    "Detailed",
    "Empty",
    "Extended",
    "External",
    "Failed",
    "Favorite",
    "First",
    "Full",
    "General",
    "Global",
    "Hidden",
    "Important",
    "Inactive",
    "Internal",
    "Large",
    "Last",
    "Light",
    "Local",
    "Main",
    "Manual",
    "Monthly",
    "My",
    "New",
    "Offline",
    "Online",
    "Other",
    "Pending",
    "Personal",
    "Previous",
    "Primary",
    "Private",
    "Public",
    "Quick",
    "Recent",
    "Remote",
    "Saved",
    "Secondary",
    "Secure",
    "Selected",
    "Shared",
    "Simple",
    "Small",
    "Temporary",
    "Unread",
    "Unsaved",
    "Visible",
    "Weekly",
    "Yearly",
];

/// Short words that complete fixed phrases ("Save As", "Sign In", "Not Now", ...).
pub const JOINERS: &[&str] = &[
    "About", "Again", "As", "Both", "Here", "In", "Later", "Less", "More", "Never", "No", "Not",
    "Now", "OK", "Out", "Up", "Yes",
];

/// Menu bar entries.
pub const MENUS: &[&str] = &[
    "Edit",
    "View",
    "Insert",
    "Format",
    "Tools",
    "Window",
    "Image",
    "Layer",
    "Run",
    "Go",
    "History",
    "Bookmarks",
    "Project",
    "Table",
];

/// Two-word button labels in common use.
pub const BUTTON_PHRASES: &[&str] = &[
    "Save As",
    "Sign In",
    "Sign Out",
    "Log In",
    "Log Out",
    "Not Now",
    "Try Again",
    "Learn More",
    "Select All",
    "Keep Both",
    "Back Up",
    "Set Up",
    "Show More",
    "Show Less",
    "Remind Later",
    "Check Now",
    "Update Now",
    "Restart Now",
    "Apply All",
    "Clear All",
];

/// Dialog buttons that answer a question, in their usual order (primary last).
pub const DIALOG_BUTTON_SETS: &[&[&str]] = &[
    &["OK"],
    &["Close"],
    &["Cancel", "OK"],
    &["No", "Yes"],
    &["Cancel", "Continue"],
    &["Cancel", "Delete"],
    &["Cancel", "Save"],
    &["Cancel", "Retry"],
    &["Later", "Restart Now"],
    &["Not Now", "Update"],
    &["Cancel", "Replace"],
    &["Deny", "Allow"],
    &["Decline", "Accept"],
    &["Skip", "Install"],
    &["Ignore", "Repair"],
    &["Cancel", "Discard", "Save"],
    &["Cancel", "No", "Yes"],
    &["Cancel", "Keep Both", "Replace"],
    &["Help", "Cancel", "OK"],
    &["Abort", "Retry", "Ignore"],
];

/// Every word of the UI vocabulary, sorted and distinct.
pub fn ui_words() -> &'static [&'static str] {
    static WORDS: LazyLock<Vec<&'static str>> = LazyLock::new(|| {
        let mut set: BTreeSet<&'static str> = BTreeSet::new();
        for list in [ACTIONS, OBJECTS, PANELS, MODIFIERS, JOINERS, MENUS] {
            set.extend(list.iter().copied());
        }
        for phrase in BUTTON_PHRASES
            .iter()
            .chain(DIALOG_BUTTON_SETS.iter().flat_map(|s| s.iter()))
        {
            set.extend(phrase.split(' '));
        }
        set.extend(["File", "Help", "Discard"]);
        set.into_iter().collect()
    });
    &WORDS
}

/// Whether every space-separated word of `label` is in the UI vocabulary.
pub fn in_vocabulary(label: &str) -> bool {
    let words = ui_words();
    !label.is_empty() && label.split(' ').all(|w| words.binary_search(&w).is_ok())
}

/// The vocabulary file's text: one word a line.
pub fn vocabulary_file_text() -> String {
    let mut s = String::new();
    for w in ui_words() {
        s.push_str(w);
        s.push('\n');
    }
    s
}

fn pick<R: Rng + ?Sized>(rng: &mut R, list: &[&'static str]) -> &'static str {
    list.choose(rng).copied().unwrap_or("OK")
}

/// A window title: "Printer Settings", "Recent Documents", "Export Report", "Calendar",
/// "Advanced Network Settings", ...
pub fn title<R: Rng + ?Sized>(rng: &mut R) -> String {
    match rng.random_range(0..6) {
        0 | 1 => format!("{} {}", pick(rng, OBJECTS), pick(rng, PANELS)),
        2 => format!("{} {}", pick(rng, MODIFIERS), pick(rng, OBJECTS)),
        3 => format!("{} {}", pick(rng, ACTIONS), pick(rng, OBJECTS)),
        4 => pick(rng, OBJECTS).to_string(),
        _ => format!(
            "{} {} {}",
            pick(rng, MODIFIERS),
            pick(rng, OBJECTS),
            pick(rng, PANELS)
        ),
    }
}

/// One button label: mostly one action, sometimes a fixed phrase or "Action Object".
pub fn button_label<R: Rng + ?Sized>(rng: &mut R) -> String {
    match rng.random_range(0..10) {
        0..=5 => pick(rng, ACTIONS).to_string(),
        6 | 7 => pick(rng, BUTTON_PHRASES).to_string(),
        _ => format!("{} {}", pick(rng, ACTIONS), pick(rng, OBJECTS)),
    }
}

/// `n` distinct button labels for a window, left to right; the last one is the primary action.
/// Often ends in a familiar pair ("Cancel", "OK").
pub fn button_labels<R: Rng + ?Sized>(rng: &mut R, n: usize) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(n);
    if n >= 2 && rng.random_bool(0.3) {
        let set = DIALOG_BUTTON_SETS.choose(rng).copied().unwrap_or(&["OK"]);
        out.extend(set.iter().take(n).map(|s| s.to_string()));
    }
    let mut guard = 0;
    while out.len() < n && guard < 100 {
        guard += 1;
        let l = button_label(rng);
        if !out.contains(&l) {
            out.push(l);
        }
    }
    out
}

/// A checkbox label: "Enable Notifications", "Show Hidden Files", "Remember Password", ...
pub fn checkbox_label<R: Rng + ?Sized>(rng: &mut R) -> String {
    const VERBS: &[&str] = &[
        "Enable", "Show", "Hide", "Allow", "Lock", "Sync", "Mute", "Block", "Encrypt", "Keep",
        "Pin", "Remind", "Share", "Update",
    ];
    match rng.random_range(0..3) {
        0 => format!(
            "{} {} {}",
            pick(rng, VERBS),
            pick(rng, MODIFIERS),
            pick(rng, OBJECTS)
        ),
        _ => format!("{} {}", pick(rng, VERBS), pick(rng, OBJECTS)),
    }
}

/// Held-out verbs: buttons and titles of held-out screens only (module docs).
pub const HELD_OUT_ACTIONS: &[&str] = &[
    "Assemble", "Bake", "Bind", "Borrow", "Brew", "Carve", "Chop", "Combine", "Cook", "Decorate",
    "Defer", "Dig", "Dock", "Drain", "Dust", "Fasten", "Feed", "Fetch", "Flip", "Gather", "Glue",
    "Grind", "Grow", "Hammer", "Harvest", "Heat", "Hire", "Hover", "Inflate", "Knit", "Lend",
    "Lift", "Melt", "Mend", "Mop", "Nudge", "Pack", "Paint", "Peel", "Plant", "Pour", "Press",
    "Prune", "Pump", "Purchase", "Rake", "Rescue", "Rinse", "Roast", "Scrub", "Sew", "Shovel",
    "Sketch", "Slice", "Soak", "Spin", "Sprinkle", "Squeeze", "Stack", "Steer", "Stir", "Stitch",
    "Sweep", "Tidy", "Toast", "Trim", "Twist", "Unpack", "Wash", "Weave", "Weigh", "Whisk", "Wrap",
];

/// Held-out nouns: buttons and titles of held-out screens only (module docs).
pub const HELD_OUT_OBJECTS: &[&str] = &[
    "Anchor",
    "Apron",
    "Bakery",
    "Barrel",
    "Basket",
    "Beacon",
    "Blanket",
    "Bottle",
    "Bracelet",
    "Bridge",
    "Bucket",
    "Cabin",
    "Candle",
    "Canoe",
    "Carpet",
    "Castle",
    "Cellar",
    "Chimney",
    "Compass",
    "Cottage",
    "Cushion",
    "Dolphin",
    "Drawer",
    "Engine",
    "Fabric",
    "Feather",
    "Fence",
    "Ferry",
    "Fountain",
    "Garden",
    "Glacier",
    "Hammock",
    "Harbor",
    "Helmet",
    "Honey",
    "Island",
    "Jacket",
    "Kettle",
    "Kitchen",
    "Ladder",
    "Lantern",
    "Lemon",
    "Lighthouse",
    "Magnet",
    "Meadow",
    "Mirror",
    "Mountain",
    "Needle",
    "Orchard",
    "Oven",
    "Paddle",
    "Parcel",
    "Pebble",
    "Pepper",
    "Pillow",
    "Pocket",
    "Pottery",
    "Puzzle",
    "Quilt",
    "Rabbit",
    "Recipe",
    "Ribbon",
    "River",
    "Saddle",
    "Sandwich",
    "Satchel",
    "Sculpture",
    "Shelf",
    "Spoon",
    "Statue",
    "Sunflower",
    "Teapot",
    "Tent",
    "Thimble",
    "Tractor",
    "Tunnel",
    "Umbrella",
    "Valley",
    "Violin",
    "Wagon",
    "Whistle",
    "Yacht",
];

/// Fraction of held-out screens whose title is made by [`held_out_title`] (decided per screen).
pub const HELD_OUT_TITLE_FRACTION: f64 = 1.0 / 3.0;

/// Fraction of held-out button labels made by [`held_out_button_label`] (decided per button).
pub const HELD_OUT_BUTTON_FRACTION: f64 = 1.0 / 3.0;

/// Every held-out word, sorted and distinct.
pub fn held_out_words() -> &'static [&'static str] {
    static WORDS: LazyLock<Vec<&'static str>> = LazyLock::new(|| {
        let set: BTreeSet<&'static str> = HELD_OUT_ACTIONS
            .iter()
            .chain(HELD_OUT_OBJECTS)
            .copied()
            .collect();
        set.into_iter().collect()
    });
    &WORDS
}

/// Whether `word` is a held-out word, ignoring case.
pub fn is_held_out_word(word: &str) -> bool {
    static LOWER: LazyLock<BTreeSet<String>> =
        LazyLock::new(|| held_out_words().iter().map(|w| w.to_lowercase()).collect());
    LOWER.contains(&word.to_lowercase())
}

/// Whether `text` holds a held-out word: one of its runs of letters and digits is one,
/// ignoring case.
pub fn has_held_out_word(text: &str) -> bool {
    text.split(|c: char| !c.is_alphanumeric())
        .any(|w| !w.is_empty() && is_held_out_word(w))
}

/// The held-out vocabulary file's text: one word a line.
pub fn held_out_vocabulary_file_text() -> String {
    let mut s = String::new();
    for w in held_out_words() {
        s.push_str(w);
        s.push('\n');
    }
    s
}

/// A title with at least one held-out word: "Garden Settings", "Recent Lantern",
/// "Export Recipe", "Harvest Invoice", "Kettle", ...
pub fn held_out_title<R: Rng + ?Sized>(rng: &mut R) -> String {
    match rng.random_range(0..6) {
        0 | 1 => format!("{} {}", pick(rng, HELD_OUT_OBJECTS), pick(rng, PANELS)),
        2 => format!("{} {}", pick(rng, MODIFIERS), pick(rng, HELD_OUT_OBJECTS)),
        3 => format!("{} {}", pick(rng, ACTIONS), pick(rng, HELD_OUT_OBJECTS)),
        4 => format!("{} {}", pick(rng, HELD_OUT_ACTIONS), pick(rng, OBJECTS)),
        _ => pick(rng, HELD_OUT_OBJECTS).to_string(),
    }
}

/// A button label with at least one held-out word: mostly one held-out verb ("Harvest"),
/// sometimes with a UI object ("Pack Files") or a UI verb with a held-out object
/// ("Open Garden").
pub fn held_out_button_label<R: Rng + ?Sized>(rng: &mut R) -> String {
    match rng.random_range(0..10) {
        0..=5 => pick(rng, HELD_OUT_ACTIONS).to_string(),
        6 | 7 => format!("{} {}", pick(rng, HELD_OUT_ACTIONS), pick(rng, OBJECTS)),
        _ => format!("{} {}", pick(rng, ACTIONS), pick(rng, HELD_OUT_OBJECTS)),
    }
}

// ---- Free-text content (not part of the UI vocabulary) ----

pub const FIRST_NAMES: &[&str] = &[
    "Alice", "Amir", "Anna", "Ben", "Carlos", "Chloe", "Daniel", "Elena", "Emma", "Farah",
    "George", "Hana", "Ivan", "Jade", "Jonas", "Julia", "Kenji", "Laura", "Leo", "Lina", "Marco",
    "Maria", "Mei", "Nadia", "Noah", "Olga", "Omar", "Paul", "Priya", "Rosa", "Sam", "Sara", "Tom",
    "Uma", "Victor", "Wei", "Yusuf", "Zoe",
];

pub const LAST_NAMES: &[&str] = &[
    "Adams", "Baker", "Berg", "Chen", "Costa", "Diaz", "Evans", "Fischer", "Garcia", "Hansen",
    "Ito", "Jensen", "Khan", "Kim", "Larsen", "Lopez", "Martin", "Meyer", "Moreau", "Nguyen",
    "Novak", "Okafor", "Park", "Patel", "Rossi", "Santos", "Schmidt", "Silva", "Smith", "Tanaka",
    "Torres", "Wagner", "Walsh", "Wong", "Young",
];

pub const CITIES: &[&str] = &[
    "Amsterdam",
    "Athens",
    "Austin",
    "Berlin",
    "Boston",
    "Cairo",
    "Chicago",
    "Dublin",
    "Denver",
    "Geneva",
    "Hamburg",
    "Helsinki",
    "Lagos",
    "Lima",
    "Lisbon",
    "London",
    "Lyon",
    "Madrid",
    "Milan",
    "Montreal",
    "Munich",
    "Nairobi",
    "Oslo",
    "Paris",
    "Porto",
    "Prague",
    "Seattle",
    "Seoul",
    "Sydney",
    "Tokyo",
    "Toronto",
    "Valencia",
    "Vienna",
    "Warsaw",
    "Zurich",
];

pub const COUNTRIES: &[&str] = &[
    "Argentina",
    "Australia",
    "Austria",
    "Brazil",
    "Canada",
    "Chile",
    "Denmark",
    "Egypt",
    "Finland",
    "France",
    "Germany",
    "Ghana",
    "Greece",
    "India",
    "Ireland",
    "Italy",
    "Japan",
    "Kenya",
    "Mexico",
    "Norway",
    "Peru",
    "Poland",
    "Portugal",
    "Spain",
    "Sweden",
    "Switzerland",
    "Turkey",
    "Vietnam",
];

pub const DOMAINS: &[&str] = &[
    "example.com",
    "example.org",
    "mail.test",
    "corp.example",
    "home.lan",
    "studio.test",
];

pub const FILE_EXTS: &[&str] = &[
    "txt", "pdf", "png", "jpg", "csv", "docx", "xlsx", "zip", "mp3", "json", "md", "log",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vocabulary_is_large_and_composes() {
        assert!(ui_words().len() >= 300, "{}", ui_words().len());
        for p in BUTTON_PHRASES {
            assert!(in_vocabulary(p), "{p}");
        }
        assert!(!in_vocabulary("Frobnicate"));
        assert!(!in_vocabulary(""));
    }

    #[test]
    fn held_out_templates_always_hold_a_held_out_word() {
        use rand::SeedableRng;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for _ in 0..2000 {
            let t = held_out_title(&mut rng);
            let b = held_out_button_label(&mut rng);
            for l in [&t, &b] {
                assert!(has_held_out_word(l), "{l}");
                assert!(!in_vocabulary(l), "{l}");
                assert!(l
                    .split(' ')
                    .all(|w| is_held_out_word(w) || in_vocabulary(w)));
            }
        }
        assert!(has_held_out_word("Open the garden."));
        assert!(!has_held_out_word("Gardens"));
        assert!(!has_held_out_word("Save As"));
    }
}
